"""LoRA's merged export: fold each adapter into the weight it adapts.

A projection with adapters computes x W + s x A B (s = alpha / rank, layers.EinsumDense),
which is x (W + s A B): the merged kernel is the plain model's, so the result applies
with the rank-0 model and converts to Hugging Face (`jaxlm convert to-hf`) like any run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.model_config import LoraConfig

ADAPTER_NAMES = ("lora_a", "lora_b")


def merged_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float):
    """kernel + scale A B, for a kernel (lead..., in..., out...) with A (lead..., in...,
    r) and B (lead..., r, out...); `lead` is a scanned stack's `layers` axis, if any."""
    lead = lora_a.ndim + lora_b.ndim - kernel.ndim - 2
    n_in = lora_a.ndim - 1 - lead
    lead_shape = kernel.shape[:lead]
    in_size = math.prod(kernel.shape[lead : lead + n_in])
    rank = lora_a.shape[-1]
    a = lora_a.astype(jnp.float32).reshape(*lead_shape, in_size, rank)
    b = lora_b.astype(jnp.float32).reshape(*lead_shape, rank, -1)
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(params: Any, lora: LoraConfig) -> Any:
    """`params` of a model with adapters `lora` as the plain model's: every module with
    `lora_a` and `lora_b` gets `kernel + (alpha / rank) A B` and loses the adapters.
    Params without adapters come back as they are."""
    if not isinstance(params, Mapping):
        return params
    if "lora_a" in params and "lora_b" in params:
        merged = {k: v for k, v in params.items() if k not in ADAPTER_NAMES}
        merged["kernel"] = merged_kernel(
            params["kernel"], params["lora_a"], params["lora_b"], lora.scale
        )
        return merged
    return {k: merge_lora(v, lora) for k, v in params.items()}


def has_adapters(params: Any) -> bool:
    """Does `params` hold LoRA adapters anywhere?"""
    if not isinstance(params, Mapping):
        return False
    return any(k in ADAPTER_NAMES or has_adapters(v) for k, v in params.items())
