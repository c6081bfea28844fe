"""The training objectives behind one interface; a family names its own in
`jaxlm.model_config.FAMILIES`.

An objective's `loss(model, params, batch, rng)` returns `(loss, weight, sums)`: the
scalar the step minimises, the number of real target tokens, and additive statistics
(sums and counts) that eval adds up over batches. `summarize` turns sums, from one
batch or many, into named metrics; `batch_ranks` names the batch's arrays and their
ranks, which fix their shardings. Everything in fp32, from the models' fp32 logits.

`counts(batch)` gives the sums that are counts (real tokens, masked tokens, examples)
from the batch alone, without the model. The loss that `summarize` computes is linear
in the other sums once the counts are fixed, so with the whole batch's counts in place
of a part's (`part_loss`), the losses of a batch's parts, and their gradients, add up
to the whole batch's: gradient accumulation (train.grad_accum) is exact for every
family, however unevenly the real tokens fall into the microbatches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxlm.model_config import FAMILIES, ModelConfig, family_of

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]
LossFn = Callable[[nn.Module, Any, Batch, "jax.Array | None"], tuple[jax.Array, jax.Array, Sums]]


@dataclass(frozen=True)
class Objective:
    loss: LossFn
    summarize: Callable[[Mapping[str, Any]], dict[str, Any]]
    batch_ranks: Mapping[str, int]
    target_keys: tuple[str, ...] = ()  # (batch, target_len) arrays: seq2seq's decoder side
    # The loss is a mean over target tokens: exp(loss) is a perplexity and an all-zero
    # (padding) row weighs nothing. MLM + NSP adds a per-row NSP mean: neither holds.
    per_token: bool = True
    # The count sums (keys of `sums`) of a batch, from its masks: see the module doc.
    counts: Callable[[Batch], Sums] | None = None

    def part_loss(
        self, model: nn.Module, params: Any, part: Batch, rng: Any, counts: Sums
    ) -> tuple[jax.Array, tuple[jax.Array, Sums]]:
        """(this part's share of the whole batch's loss, (its weight, its sums)): the loss
        of `part` normalised by the whole batch's `counts`, so the shares add up to the
        whole batch's loss and their gradients to its gradient."""
        _, weight, sums = self.loss(model, params, part, rng)
        return self.summarize(sums | counts)["loss"], (weight, sums)

    def batch_shapes(
        self, batch_size: int, seq_len: int, target_len: int = 0
    ) -> dict[str, tuple[int, ...]]:
        """Each batch array's shape: (batch,), (batch, seq_len) or (batch, target_len)."""
        length = {
            k: (target_len or seq_len) if k in self.target_keys else seq_len
            for k in self.batch_ranks
        }
        return {k: (batch_size, length[k])[:rank] for k, rank in self.batch_ranks.items()}


def _rngs(rng: jax.Array | None) -> dict | None:
    return {"dropout": rng} if rng is not None else None


def token_loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None):
    """(summed fp32 loss over counted tokens, number of counted tokens)."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        rngs=_rngs(rng),
    )
    mask = _token_mask(batch)
    labels = jnp.maximum(batch["targets"], 0)  # an ignored (negative) target: any class
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _token_mask(batch: Batch) -> jax.Array:
    """The counted tokens of a packed causal batch: real (not padding), with a target
    of 0 or more. A negative target (-100, Hugging Face's ignore index) keeps its token
    as context but out of the loss, perplexity and token count: supervised fine-tuning
    marks the prompt so (jaxlm/data/sft.py)."""
    return ((batch["segment_ids"] > 0) & (batch["targets"] >= 0)).astype(jnp.float32)


def _token_counts(batch: Batch) -> Sums:
    return {"tokens": jnp.sum(_token_mask(batch))}


def _mean(total: Any, count: Any) -> Any:
    return total / jnp.maximum(count, 1.0)


def causal_lm_loss(model, params, batch, rng=None):
    total, n_tokens = token_loss(model, params, batch, rng)
    return _mean(total, n_tokens), n_tokens, {"loss_sum": total, "tokens": n_tokens}


def _token_summary(sums: Mapping[str, Any]) -> dict[str, Any]:
    return {"loss": _mean(sums["loss_sum"], sums["tokens"])}


def _masked_ce(logits, labels, weights):
    """(summed cross-entropy, summed correct predictions, summed weights)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def mlm_nsp_loss(model, params, batch, rng=None):
    """BERT's pretraining loss: mean CE over the chosen (masked) tokens plus mean NSP CE."""
    mlm_logits, nsp_logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["token_types"],
        batch["segment_ids"],
        rngs=_rngs(rng),
    )
    mlm_loss, mlm_correct, mlm_tokens = _masked_ce(
        mlm_logits, batch["targets"], batch["mlm_mask"].astype(jnp.float32)
    )
    ones = jnp.ones(nsp_logits.shape[:1], jnp.float32)  # every row is one NSP example
    nsp_loss, nsp_correct, nsp_examples = _masked_ce(nsp_logits, batch["nsp_labels"], ones)
    sums = {
        "mlm_loss_sum": mlm_loss,
        "mlm_correct": mlm_correct,
        "mlm_tokens": mlm_tokens,
        "nsp_loss_sum": nsp_loss,
        "nsp_correct": nsp_correct,
        "nsp_examples": nsp_examples,
    }
    loss = _mean(mlm_loss, mlm_tokens) + _mean(nsp_loss, nsp_examples)
    return loss, mlm_tokens, sums


def _mlm_nsp_counts(batch: Batch) -> Sums:
    return {
        "mlm_tokens": jnp.sum(batch["mlm_mask"].astype(jnp.float32)),
        "nsp_examples": jnp.asarray(batch["nsp_labels"].shape[0], jnp.float32),
    }


def _mlm_nsp_summary(sums: Mapping[str, Any]) -> dict[str, Any]:
    mlm = _mean(sums["mlm_loss_sum"], sums["mlm_tokens"])
    nsp = _mean(sums["nsp_loss_sum"], sums["nsp_examples"])
    return {
        "loss": mlm + nsp,
        "mlm_loss": mlm,
        "nsp_loss": nsp,
        "mlm_accuracy": _mean(sums["mlm_correct"], sums["mlm_tokens"]),
        "nsp_accuracy": _mean(sums["nsp_correct"], sums["nsp_examples"]),
    }


def seq2seq_loss(model, params, batch, rng=None):
    """Cross-entropy over the real target tokens (EOS included), given the source."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["decoder_inputs"],
        batch["input_mask"],
        batch["target_mask"],
        rngs=_rngs(rng),
    )
    mask = batch["target_mask"].astype(jnp.float32)
    total, _, n_tokens = _masked_ce(logits, batch["targets"], mask)
    return _mean(total, n_tokens), n_tokens, {"loss_sum": total, "tokens": n_tokens}


def _target_counts(batch: Batch) -> Sums:
    return {"tokens": jnp.sum(batch["target_mask"].astype(jnp.float32))}


def _qa_rows(batch: Batch) -> jax.Array:
    """Rows that hold an example (an all-padding row weighs nothing)."""
    return (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)


def extractive_qa_loss(model, params, batch, rng=None):
    """BERT's SQuAD loss: the mean of the answer start's and end's cross-entropies over
    the row's positions (Hugging Face's `BertForQuestionAnswering` loss); a window
    without the answer targets position 0, [CLS]."""
    start_logits, end_logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["token_types"],
        batch["segment_ids"],
        rngs=_rngs(rng),
    )
    rows = _qa_rows(batch)
    start, start_correct, n = _masked_ce(start_logits, batch["start_positions"], rows)
    end, end_correct, _ = _masked_ce(end_logits, batch["end_positions"], rows)
    sums = {
        "start_loss_sum": start,
        "end_loss_sum": end,
        "start_correct": start_correct,
        "end_correct": end_correct,
        "examples": n,
    }
    return _mean(start + end, 2.0 * n), n, sums


def _qa_summary(sums: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "loss": _mean(sums["start_loss_sum"] + sums["end_loss_sum"], 2.0 * sums["examples"]),
        "start_accuracy": _mean(sums["start_correct"], sums["examples"]),
        "end_accuracy": _mean(sums["end_correct"], sums["examples"]),
    }


CAUSAL_LM = Objective(
    causal_lm_loss,
    _token_summary,
    {"inputs": 2, "targets": 2, "segment_ids": 2, "positions": 2},
    counts=_token_counts,
)
MLM_NSP = Objective(
    mlm_nsp_loss,
    _mlm_nsp_summary,
    {
        "inputs": 2,
        "token_types": 2,
        "segment_ids": 2,
        "targets": 2,
        "mlm_mask": 2,
        "nsp_labels": 1,
    },
    per_token=False,
    counts=_mlm_nsp_counts,
)
SEQ2SEQ = Objective(
    seq2seq_loss,
    _token_summary,
    {"inputs": 2, "input_mask": 2, "decoder_inputs": 2, "targets": 2, "target_mask": 2},
    target_keys=("decoder_inputs", "targets", "target_mask"),
    counts=_target_counts,
)


EXTRACTIVE_QA = Objective(
    extractive_qa_loss,
    _qa_summary,
    {
        "inputs": 2,
        "token_types": 2,
        "segment_ids": 2,
        "start_positions": 1,
        "end_positions": 1,
    },
    per_token=False,
    counts=lambda batch: {"examples": jnp.sum(_qa_rows(batch))},
)


OBJECTIVES = {
    "causal_lm": CAUSAL_LM,
    "mlm_nsp": MLM_NSP,
    "seq2seq": SEQ2SEQ,
    "extractive_qa": EXTRACTIVE_QA,
}


def for_family(family: str) -> Objective:
    return OBJECTIVES[FAMILIES[family].objective]


def for_model(m: ModelConfig) -> Objective:
    """The objective of `m`'s task head (`model.head`): BERT's QA head trains on
    extractive QA, not on MLM + NSP."""
    return OBJECTIVES[family_of(m).objective]
