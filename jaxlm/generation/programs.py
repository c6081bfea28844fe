"""The compiled decoding program: prefill, then a `lax.while_loop` of one-token steps.

One jitted program per (model, settings, shape buckets) does all the work on device:
the prompt pass fills the KV cache, each loop step feeds the previous token, samples
the next inside the same computation and stops early once every row is done. The cache
never leaves the program, so XLA updates it in place; nothing returns to the host
until the end.

Decoder-only prompts are left-padded: row b's leading padding slots are masked out of
attention and its positions count from its first real token, so every row writes the
same cache slot at each step. Encoder-decoder prompts are right-padded encoder inputs;
the decoder starts every row from the same start token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm import cpu_tuning
from jaxlm.generation.sampling import next_token
from jaxlm.model_config import FAMILIES

Cache = Any
First = Callable[[], tuple[jax.Array, Cache]]
Step = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]


class Settings(NamedTuple):
    """What a program is compiled for besides the model and the shapes."""

    sampling: tuple[bool, int, bool]  # `Sampling.static`
    pad_id: int  # the tokens of a row after it ended
    start_id: int  # the decoder's first input (encoder-decoders)
    return_logits: bool


class Request(NamedTuple):
    """One call's arrays: new values reuse the compiled program."""

    tokens_BP: jax.Array  # left-padded decoder prompts, or right-padded encoder inputs
    lengths_B: jax.Array  # prompt lengths
    active_B: jax.Array  # False for the rows that only fill the batch bucket
    max_new: jax.Array
    eos_E: jax.Array
    stops_XM: jax.Array  # right-aligned stop sequences, -1 where shorter
    key: jax.Array
    temperature: jax.Array
    top_p: jax.Array


def decoding_model(model: nn.Module) -> nn.Module:
    """The same module set up for inference: no remat, deterministic, and scanned layers
    unrolled where `cpu_tuning.unroll_decoding` says so (the program unstacks the
    params)."""
    scan = model.config.scan_layers and not cpu_tuning.unroll_decoding()
    config = dataclasses.replace(model.config, remat="none", scan_layers=scan)
    return model.clone(config=config, deterministic=True)


def _stop_hit(window_BM: jax.Array, stops_XM: jax.Array) -> jax.Array:
    """Does each row's latest tokens end with a stop sequence? An all -1 row is none."""
    used = stops_XM >= 0
    equal = (window_BM[:, None, :] == stops_XM[None]) | ~used[None]
    return jnp.any(jnp.all(equal, axis=-1) & jnp.any(used, axis=-1)[None], axis=-1)


def _decode_loop(
    first: First, step: Step, r: Request, s: Settings, n_new: int
) -> dict[str, jax.Array]:
    """`first()` gives the logits of the first new token and the filled cache;
    `step(cache, tokens_B, i)` feeds new token i - 1 and gives the logits of token i.
    A row is done after it emits an EOS id or ends a stop sequence; later tokens are
    `pad_id` (Hugging Face's semantics)."""
    batch = r.active_B.shape[0]

    def choose(logits_BV, i, done_B, window_BM):
        key = jax.random.fold_in(r.key, i)
        token_B = next_token(logits_BV, key, s.sampling, r.temperature, r.top_p)
        token_B = jnp.where(done_B, s.pad_id, token_B)
        window_BM = jnp.concatenate([window_BM[:, 1:], token_B[:, None]], axis=1)
        eos_B = jnp.any(token_B[:, None] == r.eos_E[None], axis=-1)
        return token_B, done_B | eos_B | _stop_hit(window_BM, r.stops_XM), window_BM

    logits_BV, cache = first()
    window_BM = jnp.full((batch, r.stops_XM.shape[1]), -2, jnp.int32)
    token_B, done_B, window_BM = choose(logits_BV, 0, ~r.active_B, window_BM)
    tokens_BN = jnp.full((batch, n_new), s.pad_id, jnp.int32).at[:, 0].set(token_B)
    state = dict(i=jnp.int32(1), tokens=tokens_BN, done=done_B, window=window_BM, cache=cache)
    state["length"] = r.active_B.astype(jnp.int32)
    if s.return_logits:
        state["logits"] = jnp.zeros((batch, n_new, logits_BV.shape[-1]), jnp.float32)
        state["logits"] = state["logits"].at[:, 0].set(logits_BV)

    def body(old):
        i = old["i"]
        previous_B = jax.lax.dynamic_index_in_dim(old["tokens"], i - 1, axis=1, keepdims=False)
        logits_BV, cache = step(old["cache"], previous_B, i)
        token_B, done_B, window_BM = choose(logits_BV, i, old["done"], old["window"])
        new = dict(i=i + 1, cache=cache, window=window_BM, done=done_B)
        new["tokens"] = jax.lax.dynamic_update_index_in_dim(old["tokens"], token_B, i, axis=1)
        new["length"] = jnp.where(old["done"], old["length"], i + 1)
        if s.return_logits:
            new["logits"] = jax.lax.dynamic_update_index_in_dim(old["logits"], logits_BV, i, 1)
        return new

    state = jax.lax.while_loop(lambda st: (st["i"] < r.max_new) & ~jnp.all(st["done"]), body, state)
    keep = ("tokens", "length", "logits") if s.return_logits else ("tokens", "length")
    return {k: state[k] for k in keep}


def _decoder_steps(model: nn.Module, params: Any, r: Request, n_new: int) -> tuple[First, Step]:
    """Prefill and step of a decoder-only model over a cache of prompt + n_new slots."""
    prompt_len = r.tokens_BP.shape[1]
    pad_B = prompt_len - r.lengths_B
    key_valid_BS = jnp.arange(prompt_len + n_new)[None, :] >= pad_B[:, None]

    def apply(cache, tokens_BL, positions_BL, slot):
        logits, cache = model.apply(
            {"params": params, **cache},
            tokens_BL,
            positions_BL=positions_BL,
            cache_index=slot,
            key_valid_BS=key_valid_BS,
            mutable=["cache"],
        )
        return logits[:, -1], cache

    def first():
        positions_BP = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_B[:, None], 0)
        return apply({}, r.tokens_BP, positions_BP, jnp.int32(0))

    def step(cache, tokens_B, i):
        slot = prompt_len + i - 1
        return apply(cache, tokens_B[:, None], (slot - pad_B)[:, None], slot)

    return first, step


def _encdec_steps(
    model: nn.Module, params: Any, r: Request, n_new: int, start_id: int
) -> tuple[First, Step]:
    """Encode once; the decoder's steps read the encoder output from the cache."""
    batch, width = r.tokens_BP.shape
    src_mask_BS = jnp.arange(width)[None, :] < r.lengths_B[:, None]
    enc_BSD = model.apply({"params": params}, r.tokens_BP, src_mask_BS, method="encode")
    slots_BN = jnp.ones((batch, n_new), jnp.int32)

    def step(cache, tokens_B, slot):
        logits, cache = model.apply(
            {"params": params, **cache},
            tokens_B[:, None],
            enc_BSD,
            src_mask_BS,
            slots_BN,
            cache_index=slot,
            method="decode",
            mutable=["cache"],
        )
        return logits[:, -1], cache

    def first():
        return step({}, jnp.full((batch,), start_id, jnp.int32), jnp.int32(0))

    return first, step


def _generate(
    model: nn.Module, settings: Settings, n_new: int, params: Any, request: Request
) -> dict[str, jax.Array]:
    if not model.config.scan_layers:  # unrolled for decoding (`decoding_model`)
        params = cpu_tuning.unstack_layers(params)
    if FAMILIES[model.config.family].kind == "encoder_decoder":
        steps = _encdec_steps(model, params, request, n_new, settings.start_id)
    else:
        steps = _decoder_steps(model, params, request, n_new)
    return _decode_loop(*steps, request, settings, n_new)


# The model, settings and n_new are static: jit's own cache holds one program for each
# of them and each shape bucket.
program = jax.jit(_generate, static_argnums=(0, 1, 2))
