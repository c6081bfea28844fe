"""`generate_ids`: token ids in, token ids out, for any decoder-only or T5 model.

Prompts are ids as the caller's tokenizer made them: no BOS is added here. Shapes are
bucketed to powers of two (batch, prompt length, new-token buffer), so a new prompt or
a different `max_new_tokens` reuses the compiled program unless a bucket changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.errors import JaxlmError
from jaxlm.generation.programs import Request, Settings, decoding_model, program
from jaxlm.generation.sampling import Sampling
from jaxlm.model_config import FAMILIES

MIN_BUCKET = 8


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass
class Generation:
    """New tokens per prompt (EOS or the stop sequence included when one ended the
    row) and, with `return_logits`, the fp32 logits each token was chosen from."""

    tokens: list[list[int]]
    logits: list[np.ndarray] | None = None


def _as_ids(name: str, rows: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    out = []
    for i, row in enumerate(rows):
        ids = [int(t) for t in row]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise JaxlmError(f"{name} {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        out.append(ids)
    return out


def _stop_array(stop: Sequence[Sequence[int]]) -> np.ndarray:
    """Stop sequences right-aligned in a (bucketed) array, -1 where shorter or absent."""
    stop = [list(s) for s in stop if len(s)]
    width = bucket(max([len(s) for s in stop] + [1]), 4)
    out = np.full((bucket(len(stop), 4), width), -1, np.int32)
    for i, s in enumerate(stop):
        out[i, width - len(s) :] = s
    return out


def _eos_array(eos_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_id is None:
        return np.full((1,), -1, np.int32)
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    return np.asarray(ids or [-1], np.int32)


def generate_ids(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    stop: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    decoder_start_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    return_logits: bool = False,
) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    `temperature` 0 is greedy (exactly argmax); above 0 it samples, with `top_k` (0 =
    off) and `top_p` (1.0 = off) and a PRNG seeded by `seed`, so the same call gives the
    same tokens. A row stops after emitting `eos_id` (one id or several) or a token
    sequence of `stop`; the loop ends when every row has. `model` is a decoder
    (prompts are its inputs) or an encoder-decoder (prompts are the encoder's inputs;
    the decoder starts from `decoder_start_id`, T5's pad). With `mesh` and `rules` the program is
    traced under them, so the cache is sharded like the model.
    """
    family = FAMILIES[model.config.family]
    if not family.generates:
        raise JaxlmError(f"cannot generate with a {model.config.family} model")
    decoder = family.kind == "decoder"
    config = model.config.resolved()
    if max_new_tokens < 1:
        raise JaxlmError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    sampling = Sampling(temperature <= 0, temperature, top_k, top_p).check()
    prompts = _as_ids("prompt", prompts, config.vocab_size)
    if not prompts:
        raise JaxlmError("no prompts to generate from")
    if decoder and min(map(len, prompts)) == 0:
        raise JaxlmError("a decoder-only model needs at least one prompt token (e.g. BOS)")
    longest = max(map(len, prompts))
    if config.position == "learned" and longest + max_new_tokens > config.max_len:
        raise JaxlmError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's {config.max_len} learned positions"
        )
    stops = _stop_array(_as_ids("stop sequence", stop, config.vocab_size))

    n_rows, n_new = len(prompts), bucket(max_new_tokens)
    batch, width = bucket(n_rows, 1), bucket(max(longest, 1))
    tokens = np.full((batch, width), pad_id, np.int32)
    lengths = np.zeros(batch, np.int32)
    for i, ids in enumerate(prompts):
        lengths[i] = len(ids)
        if decoder:
            tokens[i, width - len(ids) :] = ids  # left padding
        else:
            tokens[i, : len(ids)] = ids  # right padding, masked in the encoder
    request = Request(
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(np.arange(batch) < n_rows),
        jnp.int32(max_new_tokens),
        jnp.asarray(_eos_array(eos_id)),
        jnp.asarray(stops),
        jax.random.PRNGKey(seed),
        jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p),
    )
    settings = Settings(sampling.static, pad_id, decoder_start_id, return_logits)
    context = contextlib.ExitStack()
    if mesh is not None:
        context.enter_context(jax.set_mesh(mesh))
        context.enter_context(nn.logical_axis_rules(rules or ()))
    with context:
        out = program(decoding_model(model), settings, n_new, params, request)
    out = jax.device_get(out)
    new_lengths = out["length"][:n_rows]
    result = Generation([out["tokens"][i, :n].tolist() for i, n in enumerate(new_lengths)])
    if return_logits:
        result.logits = [out["logits"][i, :n] for i, n in enumerate(new_lengths)]
    return result
