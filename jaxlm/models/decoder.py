"""A GPT-2-style decoder-only causal LM as plain Flax Linen modules.

It knows nothing of training or data: `init`/`apply` with token ids (and, for
packed rows, segment ids and positions) give fp32 logits. Layers can be stacked
with `nn.scan` (one compiled layer, a leading `layers` axis on every block param)
and wrapped in `nn.remat`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.config import ModelConfig
from jaxlm.models.attention import SelfAttention, attention_bias
from jaxlm.models.layers import GeluMlp, layer_norm, logical

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block; returns `(x, None)` so it can be scanned."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array, bias_B1LL: jax.Array) -> tuple[jax.Array, None]:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        out_scale = (2 * c.n_layers) ** -0.5  # GPT-2's residual-branch init scaling
        h = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_attn")(x_BLD)
        x_BLD = x_BLD + SelfAttention(
            c.n_heads,
            c.head_dim,
            out_scale,
            c.dropout,
            dtype,
            param_dtype,
            self.deterministic,
            name="attn",
        )(h, bias_B1LL)
        h = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_mlp")(x_BLD)
        x_BLD = x_BLD + GeluMlp(
            c.ff_dim,
            out_scale,
            c.dropout,
            dtype,
            param_dtype,
            self.deterministic,
            name="mlp",
        )(h)
        return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), None


class Decoder(nn.Module):
    """Token ids (B, L) -> logits (B, L, V) in fp32."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(tokens_BL)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
            name="embed",
        )
        pos_embed = nn.Embed(
            c.max_len,
            c.d_model,
            embedding_init=logical(nn.initializers.normal(0.01), ("max_len", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
            name="pos_embed",
        )
        x = embed(tokens_BL) + pos_embed(positions_BL)
        x = nn.Dropout(c.dropout)(x, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "length", "embed"))
        bias = attention_bias(segment_ids_BL, causal=True)

        block = DecoderBlock
        if c.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(c, self.deterministic, name="layers")(x, bias)
        else:
            for i in range(c.n_layers):
                x, _ = block(c, self.deterministic, name=f"layers_{i}")(x, bias)

        x = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_final")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                c.vocab_size,
                use_bias=False,
                kernel_init=logical(nn.initializers.normal(0.02), ("embed", "vocab")),
                dtype=dtype,
                param_dtype=param_dtype,
                name="lm_head",
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)
