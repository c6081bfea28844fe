"""Choosing the next token from fp32 logits, fused into the decoding step.

Greedy is exactly argmax (ties go to the lowest id, as torch and Hugging Face). Sampling
follows Hugging Face's order: divide by the temperature, keep the top k, keep the
nucleus (the smallest set of the most likely tokens whose probability reaches top_p),
then draw. With top-k the nucleus is found among the k survivors, so the vocabulary is
sorted only when top-p is used without top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm.errors import JaxlmError


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. `greedy` ignores the rest; top_k 0 and top_p 1.0 are off."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> Sampling:
        if not self.greedy:
            if not self.temperature > 0:
                raise JaxlmError(f"temperature {self.temperature}: must be > 0 when sampling")
            if not 0.0 < self.top_p <= 1.0:
                raise JaxlmError(f"top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise JaxlmError(f"top_k {self.top_k}: must be >= 0 (0 = off)")
        return self

    @property
    def static(self) -> tuple[bool, int, bool]:
        """What changes the compiled program (temperature and top_p values don't)."""
        return self.greedy, (0 if self.greedy else self.top_k), (not self.greedy and self.top_p < 1)


def nucleus_mask(sorted_logits_BK: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """True for the nucleus of logits sorted in descending order: a token stays while
    the probability mass before it is still below `top_p` (so the first always does)."""
    probs = jax.nn.softmax(sorted_logits_BK, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < top_p


def top_p_filter(logits_BV: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Logits with -inf outside the nucleus, for unsorted logits."""
    order = jnp.argsort(-logits_BV, axis=-1)
    keep_sorted = nucleus_mask(jnp.take_along_axis(logits_BV, order, axis=-1), top_p)
    keep = (
        jnp.zeros_like(keep_sorted)
        .at[jnp.arange(logits_BV.shape[0])[:, None], order]
        .set(keep_sorted)
    )
    return jnp.where(keep, logits_BV, -jnp.inf)


def greedy_token(logits_BV: jax.Array) -> jax.Array:
    """argmax over the vocabulary, lowest id on ties, as a max and a min of ids.

    Two plain reductions instead of XLA's variadic (value, index) argmax reduce, which
    XLA's CPU backend runs slower (benchmarks/README.md); the ids and the tie rule are
    the same. A NaN counts as a hit, so a row with NaNs still gets a valid id.
    """
    best_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    hit_BV = (logits_BV == best_B1) | jnp.isnan(logits_BV)
    ids_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    return jnp.min(jnp.where(hit_BV, ids_BV, logits_BV.shape[-1]), axis=-1)


def next_token(
    logits_BV: jax.Array,
    key: jax.Array,
    static: tuple[bool, int, bool],
    temperature: jax.Array | float,
    top_p: jax.Array | float,
) -> jax.Array:
    """(B,) int32 tokens; `static` is `Sampling.static`."""
    greedy, top_k, use_top_p = static
    if greedy:
        return greedy_token(logits_BV)
    logits_BV = logits_BV / temperature
    if top_k:
        values_BK, ids_BK = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
    elif use_top_p:
        ids_BK = jnp.argsort(-logits_BV, axis=-1)
        values_BK = jnp.take_along_axis(logits_BV, ids_BK, axis=-1)
    else:
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
    if use_top_p:
        values_BK = jnp.where(nucleus_mask(values_BK, top_p), values_BK, -jnp.inf)
    choice_B = jax.random.categorical(key, values_BK, axis=-1)
    return jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
