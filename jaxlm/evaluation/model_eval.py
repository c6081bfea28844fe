"""A model's loss on a text set, through the same data path and objective as training.

Examples go through the family's training pipeline (packing for decoders, MLM + NSP
pairs for BERT, source -> target pairs for T5) one row at a time, unshuffled, and
are regrouped into batches whose last one is padded with empty rows, so every token
of the text is scored exactly once. Metrics come from the objective's additive sums,
so they equal a single pass over the whole set, whatever the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from jaxlm import sharding as shd
from jaxlm.data import sft
from jaxlm.data.pipeline import make_dataset
from jaxlm.data.tasks import encode_splits, stream_maker
from jaxlm.errors import JaxlmError
from jaxlm.model_config import FAMILIES
from jaxlm.train.metrics import perplexity
from jaxlm.train.objectives import for_model
from jaxlm.train.step import make_eval_step

Batch = dict[str, np.ndarray]


def _batches(rows: Iterator[Batch], batch_size: int, pad_last: bool) -> Iterator[Batch]:
    """Single-row batches regrouped by `batch_size`; the last is padded with all-zero
    rows (zero weight in every objective) or, when `pad_last` is False, dropped."""
    group: list[Batch] = []
    for row in rows:
        group.append(row)
        if len(group) == batch_size:
            yield {k: np.concatenate([r[k] for r in group]) for k in group[0]}
            group = []
    if group and pad_last:
        filler = {k: np.zeros_like(v) for k, v in group[0].items()}
        group += [filler] * (batch_size - len(group))
        yield {k: np.concatenate([r[k] for r in group]) for k in group[0]}


def _text_bytes(examples: Sequence[Any]) -> int:
    return sum(len(doc.encode("utf-8")) for doc in examples)


def evaluate_model(
    pretrained: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    seq_len: int = 0,
    max_batches: int = 0,
) -> dict[str, Any]:
    """Metrics of `pretrained` (from `load_pretrained`) on `examples` (documents,
    (source, target) pairs for T5, or SFT records, scored on the tokens their training
    counts). `seq_len` 0 is the training length; `max_batches` 0 is the whole set.

    Decoders and T5 report `loss` (mean nats per target token, EOS included) and
    `perplexity` = exp(loss); decoders also `bits_per_byte` = summed nats / ln 2 /
    UTF-8 bytes of the text, when the whole set was read. BERT reports its masked-token
    and NSP accuracies (its last partial batch is dropped: NSP weights every row).
    """
    model, params, tokenizer, config = pretrained
    family = config.model.family
    seq_len = seq_len or config.train.seq_len
    if seq_len > config.model.max_len:
        raise JaxlmError(f"--seq-len {seq_len} exceeds the model's max_len {config.model.max_len}")
    if not examples:
        raise JaxlmError("no examples to evaluate")
    objective = for_model(config.model)
    # SFT examples (data/sft.py) are scored on their counted tokens, in packed rows.
    is_sft = isinstance(examples[0], sft.Record)
    examples = encode_splits(config, tokenizer, [examples], seq_len, log=False)[0]
    rows = make_dataset(
        examples,
        tokenizer,
        seq_len=seq_len,
        batch_size=1,
        seed=0,
        shuffle=False,
        repeat=False,
        make_stream=sft.sft_stream if is_sft else stream_maker(config, tokenizer),
    )
    mesh = shd.make_mesh(config.mesh)
    rules = shd.logical_rules(config.mesh)

    sums_of = jax.jit(make_eval_step(model, objective))  # the trainer's eval step
    totals: dict[str, float] = {}
    n_batches = 0
    truncated = False
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batches = _batches(iter(rows), batch_size, pad_last=objective.per_token)
        total = -(-len(rows) // batch_size) if hasattr(rows, "__len__") else None
        # disable=None: a bar on a terminal, nothing in logs
        for batch in tqdm(batches, "scoring", total=total, disable=None, leave=False):
            if max_batches and n_batches == max_batches:
                truncated = True
                break
            for k, v in jax.device_get(sums_of(params, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
    if not n_batches:
        raise JaxlmError(
            f"the data makes no full batch of {batch_size}; lower --batch-size or add data"
        )

    results: dict[str, Any] = {"family": family, "batches": n_batches}
    metrics = {k: float(v) for k, v in objective.summarize(totals).items()}
    if not objective.per_token:  # BERT: its masked tokens, or its QA head's rows
        if "mlm_tokens" in totals:
            results["masked_tokens"] = int(totals["mlm_tokens"])
        else:
            results["rows"] = int(totals["examples"])
        return results | metrics
    results |= {
        "tokens": int(totals["tokens"]),
        "loss": metrics["loss"],
        "perplexity": perplexity(metrics["loss"]),
    }
    if FAMILIES[family].kind == "decoder" and not is_sft and not truncated:  # every byte
        results["bytes"] = _text_bytes(examples)
        results["bits_per_byte"] = totals["loss_sum"] / math.log(2) / results["bytes"]
    return results
