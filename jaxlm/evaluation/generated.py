"""Text generated for scoring: greedy continuations of each source, in batches.

Prompts follow the training conventions: a decoder sees BOS + source and continues
it; T5 encodes source + EOS and its decoder starts from BOS, as in data/seq2seq.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from jaxlm import sharding as shd
from jaxlm.generation import generate_ids
from jaxlm.model_config import FAMILIES


def generate_texts(
    pretrained: Any,
    sources: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """One greedy output per source, without the prompt and without EOS."""
    model, params, tokenizer, config = pretrained
    mesh, rules = shd.make_mesh(config.mesh), shd.logical_rules(config.mesh)
    encdec = FAMILIES[config.model.family].kind == "encoder_decoder"
    budget = config.train.seq_len - 1  # the source length the model was trained on
    eos, bos = tokenizer.eos_id(), tokenizer.bos_id()
    outputs: list[str] = []
    starts = range(0, len(sources), batch_size)
    # disable=None: a bar on a terminal, nothing in logs
    for start in tqdm(starts, "generating", disable=None, leave=False):
        chunk = sources[start : start + batch_size]
        if encdec:
            prompts = [[*tokenizer.encode(s)[:budget], eos] for s in chunk]
        else:
            room = config.model.max_len - max_new_tokens - 1
            prompts = [[bos, *tokenizer.encode(s)[-room:]] for s in chunk]
        result = generate_ids(
            model,
            params,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=eos,
            pad_id=tokenizer.pad_id(),
            decoder_start_id=bos,
            mesh=mesh,
            rules=rules,
        )
        for ids in result.tokens:
            outputs.append(tokenizer.decode([t for t in ids if t != eos]))
    return outputs
