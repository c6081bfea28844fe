"""The compiled decoding programs: prefill, then a `lax.while_loop` of one-token steps.

One jitted program per (model, sampling kind, shapes) does all the work on device:
the prompt pass fills the KV cache, each loop step feeds the previous token, samples
the next inside the same computation and stops early once every row is done. The cache
never leaves the program, so XLA updates it in place; nothing returns to the host
until the end.

Decoder-only prompts are left-padded: row b's `pad_B[b]` leading slots are masked out
of attention and its positions count from its first real token, so every row writes
the same cache slot at each step. Encoder-decoder prompts are right-padded encoder
inputs; the decoder starts every row from the same start token.

Programs compile with jaxlm's XLA options for their batch (`jaxlm.runtime`: on CPU,
Eigen's matrix-vector path for one row, about 1.7x YNNPACK on the tiny config; YNNPACK
for 2 or more rows, 1.3-2.8x Eigen). On CPU the steps also read output-major copies of
the big kernels (`jaxlm.models.projection.OUTPUT_MAJOR`, made by `step_kernels`), which
XLA's GEMMs stream once for all rows: GPT-2 small at 8 rows 1.26-1.48x.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.generation.sampling import next_token
from jaxlm.models.attention import grow_cache
from jaxlm.models.encdec import T5
from jaxlm.models.projection import OUTPUT_MAJOR
from jaxlm.models.stack import unstack_layers
from jaxlm.runtime import compiler_options, output_major_kernels, unrolled_decoding

Cache = Any


def decoding_model(model: nn.Module) -> nn.Module:
    """The same module, set up for inference: no remat, deterministic, and on CPU
    layers unrolled (`runtime.unrolled_decoding`; the programs unstack scanned params
    themselves, `decoding_params`)."""
    scan = model.config.scan_layers and not unrolled_decoding()
    config = dataclasses.replace(model.config, remat="none", scan_layers=scan)
    return model.clone(config=config, deterministic=True)


def decoding_params(model: nn.Module, params: Any) -> Any:
    """`params` as the decoding `model` reads them: a scanned stack's params unstacked
    when it runs unrolled (`stack.unstack_layers`)."""
    return params if model.config.scan_layers else unstack_layers(params)


def _stop_hit(window_BM: jax.Array, stops_XM: jax.Array) -> jax.Array:
    """Does each row's latest tokens end with a stop sequence? Stops are right-aligned
    in `stops_XM`, -1 where shorter; an all -1 row is no stop."""
    used = stops_XM >= 0
    equal = (window_BM[:, None, :] == stops_XM[None]) | ~used[None]
    return jnp.any(jnp.all(equal, axis=-1) & jnp.any(used, axis=-1)[None], axis=-1)


def _decode_loop(
    first: Callable[[], tuple[jax.Array, Cache]],
    step: Callable[[Cache, jax.Array, jax.Array, int], tuple[jax.Array, Cache]],
    phase_ends: Sequence[int],
    grow: Callable[[Cache, int], Cache] | None,
    active_B: jax.Array,
    n_new: int,
    max_new: jax.Array,
    eos_E: jax.Array,
    stops_XM: jax.Array,
    key: jax.Array,
    static: tuple[bool, int, bool],
    temperature: jax.Array,
    top_p: jax.Array,
    pad_id: int,
    return_logits: bool,
) -> dict[str, jax.Array]:
    """`first()` gives the logits of the first new token and the filled cache;
    `step(cache, tokens_B, i, phase)` feeds new token i - 1 and gives the logits of
    token i (the cache: whatever `first` made for the steps). The steps run as one
    `lax.while_loop` per phase: phase p has the steps before `phase_ends[p]`, and from
    the second phase on, `grow(cache, p)` first lengthens the cache for them.
    A row is done after it emits an EOS id or ends a stop sequence; later tokens are
    `pad_id` (Hugging Face's semantics)."""
    batch = active_B.shape[0]

    def choose(logits_BV, i, done_B, window_BM):
        token_B = next_token(logits_BV, jax.random.fold_in(key, i), static, temperature, top_p)
        token_B = jnp.where(done_B, pad_id, token_B)
        window_BM = jnp.concatenate([window_BM[:, 1:], token_B[:, None]], axis=1)
        ends = jnp.any(token_B[:, None] == eos_E[None], axis=-1) | _stop_hit(window_BM, stops_XM)
        return token_B, done_B | ends, window_BM

    logits_BV, cache = first()
    window_BM = jnp.full((batch, stops_XM.shape[1]), -2, jnp.int32)
    token_B, done_B, window_BM = choose(logits_BV, 0, ~active_B, window_BM)
    tokens_BN = jnp.full((batch, n_new), pad_id, jnp.int32).at[:, 0].set(token_B)
    length_B = active_B.astype(jnp.int32)
    state = dict(i=jnp.int32(1), tokens=tokens_BN, done=done_B, length=length_B)
    state.update(cache=cache, window=window_BM)
    if return_logits:
        state["logits"] = jnp.zeros((batch, n_new, logits_BV.shape[-1]), jnp.float32)
        state["logits"] = state["logits"].at[:, 0].set(logits_BV)

    def body(s, phase):
        i = s["i"]
        previous_B = jax.lax.dynamic_index_in_dim(s["tokens"], i - 1, axis=1, keepdims=False)
        logits_BV, cache = step(s["cache"], previous_B, i, phase)
        token_B, done_B, window_BM = choose(logits_BV, i, s["done"], s["window"])
        new = dict(i=i + 1, cache=cache, window=window_BM, done=done_B)
        new["tokens"] = jax.lax.dynamic_update_index_in_dim(s["tokens"], token_B, i, axis=1)
        new["length"] = jnp.where(s["done"], s["length"], i + 1)
        if return_logits:
            new["logits"] = jax.lax.dynamic_update_index_in_dim(s["logits"], logits_BV, i, 1)
        return new

    for phase, end in enumerate(phase_ends):
        if phase:
            state["cache"] = grow(state["cache"], phase)
        stop = jnp.minimum(max_new, end)
        state = jax.lax.while_loop(
            lambda s, stop=stop: (s["i"] < stop) & ~jnp.all(s["done"]),
            functools.partial(body, phase=phase),
            state,
        )
    out = dict(tokens=state["tokens"], length=state["length"])
    if return_logits:
        out["logits"] = state["logits"]
    return out


# Attention over the KV cache costs per slot (GPT-2 small's 8-row steps: 27 ms with
# 64 slots, 34 ms with 160), so the steps run in phases that attend only the slots
# written so far plus the phase's own. Each phase compiles its own loop body: for 128
# new tokens at 8 rows, two phases were 1.04x one for +0.9 s of compile, four 1.03x
# two for +3 s. Several rows at a time is batch work (eval sets, pipelines) that
# reuses the program, so it takes four; one row, which reads an eighth of that cache
# per step and gained 1.01x, keeps one (benchmarks/README.md). A phase adds at least
# PHASE_SLOTS slots.
PHASE_SLOTS, MAX_PHASES = 32, 4


def cache_phases(prompt_len: int, n_new: int, rows: int) -> list[int]:
    """The KV cache's length in each decoding phase of `rows` rows: the prompt plus an
    equal share of the `n_new` slots per phase, at most MAX_PHASES phases of at least
    PHASE_SLOTS (one phase for one row)."""
    width = n_new if rows == 1 else max(PHASE_SLOTS, -(-n_new // MAX_PHASES))
    return [prompt_len + min(n_new, end) for end in range(width, n_new + width, width)]


@functools.cache
def output_major_program(model: nn.Module) -> Callable:
    """jit(params -> {OUTPUT_MAJOR: ...}): the kernels a decoding step reads, transposed
    to (out axes, in axes), from one dummy decoding apply whose compute XLA drops ({}
    when no kernel is big enough, `projection.OUTPUT_MAJOR_MIN_BYTES`)."""

    def make(params: Any) -> dict[str, Any]:
        params = decoding_params(model, params)
        one_B1 = jnp.zeros((1, 1), jnp.int32)
        mutable = ["cache", OUTPUT_MAJOR]
        if isinstance(model, T5):
            enc_BSD = jnp.zeros((1, 1, model.config.resolved().d_model), jnp.float32)
            _, made = model.apply(
                {"params": params}, one_B1, enc_BSD, None, one_B1 + 1,
                cache_index=jnp.int32(0), method=T5.decode, mutable=mutable,
            )  # fmt: skip
        else:
            _, made = model.apply(
                {"params": params}, one_B1, cache_index=jnp.int32(0),
                key_valid_BS=jnp.ones((1, 1), bool), mutable=mutable,
            )  # fmt: skip
        return {OUTPUT_MAJOR: made[OUTPUT_MAJOR]} if OUTPUT_MAJOR in made else {}

    return jax.jit(make)


# (model, weak references to the param leaves, their step kernels): the latest only.
_latest_kernels: list[tuple[nn.Module, list[weakref.ref], dict[str, Any]]] = []


def step_kernels(model: nn.Module, params: Any, batch: int) -> dict[str, Any]:
    """What a decoding step reads besides params and cache: on CPU, where they pay
    (`jaxlm.runtime.output_major_kernels`), the output-major kernels; else {}.

    They are kept for the latest params, held by weak references, so generating again
    with the same weights transposes them once, as an inference engine packs its
    weights once (0.22 s a call on GPT-2 small). New params, or the old ones freed,
    replace them."""
    leaves = jax.tree_util.tree_leaves(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    if not output_major_kernels(batch, weight_bytes):
        return {}
    if _latest_kernels:
        held, refs, kernels = _latest_kernels[0]
        same = held == model and len(refs) == len(leaves)
        if same and all(ref() is x for ref, x in zip(refs, leaves, strict=True)):
            return kernels
    _latest_kernels.clear()  # free the old copies before making new ones
    kernels = output_major_program(model)(params)
    try:
        _latest_kernels.append((model, [weakref.ref(x) for x in leaves], kernels))
    except TypeError:  # leaves that take no weak reference: not kept
        _latest_kernels.clear()
    return kernels


def clear_caches() -> None:
    """Forget compiled programs and kept kernels (after changing how they are built)."""
    for program in (decoder_program, encdec_program, output_major_program):
        program.cache_clear()
    _latest_kernels.clear()


@functools.cache
def decoder_program(
    model: nn.Module, static: tuple[bool, int, bool], pad_id: int, return_logits: bool, batch: int
) -> Callable:
    """jit(run) for a decoder-only model and `batch` rows (which picks the XLA
    options); the steps read `kernels` (`step_kernels`) besides params and cache;
    `n_new` (the token buffer) is static."""

    def run(
        params, kernels, prompt_BP, pad_B, active_B, max_new, eos_E, stops_XM, key,
        temperature, top_p, n_new,
    ):  # fmt: skip
        params = decoding_params(model, params)
        prompt_len = prompt_BP.shape[1]
        lengths = cache_phases(prompt_len, n_new, batch)
        key_valid_BS = jnp.arange(lengths[-1])[None, :] >= pad_B[:, None]

        def first():
            positions_BP = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_B[:, None], 0)
            logits, variables = model.apply(
                {"params": params},
                prompt_BP,
                positions_BL=positions_BP,
                cache_index=jnp.int32(0),
                key_valid_BS=key_valid_BS[:, : lengths[0]],
                mutable=["cache"],
            )
            return logits[:, -1], {**kernels, **variables}

        def step(variables, tokens_B, i, phase):
            slot = prompt_len + i - 1
            logits, cache = model.apply(
                {"params": params, **variables},
                tokens_B[:, None],
                positions_BL=(slot - pad_B)[:, None],
                cache_index=slot,
                key_valid_BS=key_valid_BS[:, : lengths[phase]],
                mutable=["cache"],
            )
            return logits[:, -1], {**variables, **cache}

        def grow(variables, phase):
            return {**variables, "cache": grow_cache(variables["cache"], lengths[phase])}

        # Step i writes slot prompt_len + i - 1, so a cache `length` long serves the
        # steps before length - prompt_len + 1.
        ends = [length - prompt_len + 1 for length in lengths]
        return _decode_loop(
            first, step, ends, grow, active_B, n_new, max_new, eos_E, stops_XM, key, static,
            temperature, top_p, pad_id, return_logits,
        )  # fmt: skip

    return jax.jit(run, static_argnames=("n_new",), compiler_options=compiler_options(rows=batch))


@functools.cache
def encdec_program(
    model: nn.Module,
    static: tuple[bool, int, bool],
    pad_id: int,
    start_id: int,
    return_logits: bool,
    batch: int,
) -> Callable:
    """jit(run) for an encoder-decoder and `batch` rows: encode once, then decode from
    the start token; the steps read `kernels` as the decoder program's do."""

    def run(
        params,
        kernels,
        src_BS,
        src_mask_BS,
        active_B,
        max_new,
        eos_E,
        stops_XM,
        key,
        temperature,
        top_p,
        n_new,
    ):
        batch = src_BS.shape[0]
        params = decoding_params(model, params)
        enc_BSD = model.apply({"params": params}, src_BS, src_mask_BS, method=T5.encode)
        slots_BN = jnp.ones((batch, n_new), jnp.int32)

        def decode(variables, tokens_B, slot, mutable):
            logits, made_now = model.apply(
                {"params": params, **variables},
                tokens_B[:, None],
                enc_BSD,
                src_mask_BS,
                slots_BN,
                cache_index=slot,
                method=T5.decode,
                mutable=mutable,
            )
            return logits[:, -1], {**variables, **made_now}

        def first():
            start_B = jnp.full((batch,), start_id, jnp.int32)
            logits_B, cache = decode({}, start_B, jnp.int32(0), ["cache"])
            return logits_B, {**kernels, **cache}

        def step(variables, tokens_B, i, phase):
            return decode(variables, tokens_B, i, ["cache"])

        return _decode_loop(
            first, step, [n_new], None, active_B, n_new, max_new, eos_E, stops_XM, key, static,
            temperature, top_p, pad_id, return_logits,
        )  # fmt: skip

    return jax.jit(run, static_argnames=("n_new",), compiler_options=compiler_options(rows=batch))
