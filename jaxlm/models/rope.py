"""Rotary position embeddings (RoPE), applied to queries and keys inside attention.

Angles come from the per-document `positions` of a packed row, so a document packed
after another sees the same rotations as it would alone. The rotation pairs the two
halves of each head (the GPT-NeoX / Hugging Face Llama layout, not Meta's interleaved
pairs), which is what converted Hugging Face checkpoints expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm.model_config import ModelConfig


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of a checkpoint's RoPE, as Hugging Face's `rope_scaling` names
    it: `linear` divides every frequency by `factor` (position interpolation); `llama3`
    divides only the long wavelengths (beyond `original_max_len / low_freq_factor`),
    keeps the short ones (below `original_max_len / high_freq_factor`) and ramps
    smoothly in between."""

    kind: str  # linear | llama3
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


def rope_scaling(c: ModelConfig) -> RopeScaling | None:
    """The config's RoPE scaling (`model.rope_scaling*`), None when off."""
    if not c.rope_scaling:
        return None
    return RopeScaling(
        c.rope_scaling,
        c.rope_scaling_factor,
        c.rope_low_freq_factor,
        c.rope_high_freq_factor,
        c.rope_original_max_len,
    )


def inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None):
    """(head_dim // 2,) fp32 rotation speeds base^(-2i / head_dim), scaled if asked."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    wavelen = 2 * jnp.pi / inv_freq
    long_wavelen = scaling.original_max_len / scaling.low_freq_factor
    short_wavelen = scaling.original_max_len / scaling.high_freq_factor
    ramp = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - ramp) * inv_freq / scaling.factor + ramp * inv_freq
    scaled = jnp.where(wavelen < short_wavelen, inv_freq, smoothed)
    return jnp.where(wavelen > long_wavelen, inv_freq / scaling.factor, scaled)


def rope_angles(
    positions_BL: jax.Array, head_dim: int, base: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """(B, L, head_dim // 2) angles in fp32: position * base^(-2i / head_dim), scaled."""
    return positions_BL.astype(jnp.float32)[..., None] * inverse_frequencies(
        head_dim, base, scaling
    )


def apply_rope(
    x_BLNH: jax.Array,
    positions_BL: jax.Array,
    base: float,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotate each head's (first half, second half) pairs by the position's angles.

    Angles, sin and cos are fp32; the rotation itself is in `x`'s dtype, as Hugging Face
    Llama does it. Rotating in fp32 made XLA fold the upcast into the query and key
    projections, which then wrote fp32 outputs and converted them back in the backward
    pass: more bytes moved for no accuracy a bf16 projection had kept.
    """
    half = x_BLNH.shape[-1] // 2
    angles = rope_angles(positions_BL, x_BLNH.shape[-1], base, scaling)[:, :, None, :]
    sin, cos = jnp.sin(angles).astype(x_BLNH.dtype), jnp.cos(angles).astype(x_BLNH.dtype)
    x1, x2 = x_BLNH[..., :half], x_BLNH[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
