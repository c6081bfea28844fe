"""Multi-head self-attention with causal and document (segment) masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.models.layers import EinsumDense


def attention_bias(segment_ids_BL: jax.Array, causal: bool = True) -> jax.Array:
    """Additive fp32 bias (B, 1, L, L): 0 where a query may attend a key, else -inf-ish.

    Tokens attend only within their own segment, so packed documents stay apart. A
    large finite negative keeps fully padded rows finite instead of NaN.
    """
    same = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    if causal:
        length = segment_ids_BL.shape[1]
        same = same & jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    return jnp.where(same, 0.0, jnp.finfo(jnp.float32).min)[:, None].astype(jnp.float32)


def dot_product_attention(
    q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array, bias_B1LL: jax.Array
) -> jax.Array:
    """The einsum reference: softmax in fp32 whatever the compute dtype."""
    scale = q_BLNH.shape[-1] ** -0.5
    scores = jnp.einsum("bqnh,bknh->bnqk", q_BLNH, k_BLNH).astype(jnp.float32) * scale
    probs = jax.nn.softmax(scores + bias_B1LL, axis=-1).astype(v_BLNH.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v_BLNH)


class SelfAttention(nn.Module):
    n_heads: int
    head_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array, bias_B1LL: jax.Array) -> jax.Array:
        d_model = x_BLD.shape[-1]

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_shape = (d_model, self.n_heads, self.head_dim)
        qkv_axes = ("embed", "heads", "head_dim")

        def project(name: str) -> jax.Array:
            y = EinsumDense(
                "bld,dnh->blnh",
                qkv_shape,
                qkv_axes,
                ("heads", "head_dim"),
                name=name,
                **kw,
            )(x_BLD)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "head_dim"))

        q, k, v = project("query"), project("key"), project("value")
        out_BLNH = dot_product_attention(q, k, v, bias_B1LL)
        out_BLNH = nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "head_dim"))
        out = EinsumDense(
            "blnh,nhd->bld",
            (self.n_heads, self.head_dim, d_model),
            ("heads", "head_dim", "embed"),
            ("embed",),
            self.out_init_scale,
            name="out",
            **kw,
        )(out_BLNH)
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)
