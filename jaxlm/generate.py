"""Sampling from a decoder, as one compiled program.

A fixed-size token buffer is filled left to right inside `lax.fori_loop`; each step
reruns the model over the buffer (no KV cache yet), which keeps one compiled shape
for any prompt shorter than the buffer, so repeated calls never recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def sample_logits(
    logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int
) -> jax.Array:
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1)


@functools.cache
def _sampler(model: nn.Module, temperature: float, top_k: int) -> Callable:
    @jax.jit
    def run(params, tokens, start, stop, rng):
        def body(i, carry):
            tokens, rng = carry
            rng, step_rng = jax.random.split(rng)
            logits = model.apply({"params": params}, tokens)
            next_token = sample_logits(logits[:, i - 1], step_rng, temperature, top_k)
            return tokens.at[:, i].set(next_token.astype(tokens.dtype)), rng

        return jax.lax.fori_loop(start, stop, body, (tokens, rng))[0]

    return run


def generate(
    model: nn.Module,
    params: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    buffer_len: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> list[int]:
    """Continue `prompt_ids` (BOS is prepended) by up to `max_new_tokens`, stopping at EOS."""
    prompt = [BOS_ID, *prompt_ids][-buffer_len + 1 :]
    total = min(buffer_len, len(prompt) + max_new_tokens)
    tokens = np.full((1, buffer_len), PAD_ID, np.int32)
    tokens[0, : len(prompt)] = prompt
    run = _sampler(model, temperature, top_k)
    out = run(params, jnp.asarray(tokens), len(prompt), total, jax.random.PRNGKey(seed))
    new = [int(t) for t in np.asarray(out)[0, len(prompt) : total]]
    return new[: new.index(EOS_ID)] if EOS_ID in new else new
