"""Rotary position embeddings (RoPE), applied to queries and keys inside attention.

Angles come from the per-document `positions` of a packed row, so a document packed
after another sees the same rotations as it would alone. The rotation pairs the two
halves of each head (the GPT-NeoX / Hugging Face Llama layout, not Meta's interleaved
pairs), which is what converted Hugging Face checkpoints expect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions_BL: jax.Array, head_dim: int, base: float) -> jax.Array:
    """(B, L, head_dim // 2) angles in fp32: position * base^(-2i / head_dim)."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions_BL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, base: float) -> jax.Array:
    """Rotate each head's (first half, second half) pairs by the position's angles, in fp32."""
    half = x_BLNH.shape[-1] // 2
    angles = rope_angles(positions_BL, x_BLNH.shape[-1], base)[:, :, None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x = x_BLNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLNH.dtype)
