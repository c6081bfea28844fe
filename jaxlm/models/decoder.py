"""The decoder-only causal LM (GPT-2 and Llama/Mistral-style) as plain Flax Linen modules.

It knows nothing of training or data: `init`/`apply` with token ids (and, for
packed rows, segment ids and positions) give fp32 logits. The config's fields pick
the parts (LayerNorm or RMSNorm, GELU or SwiGLU, learned positions or RoPE, grouped
kv heads, biases, tied output, sliding window); `model.family` only fills in those
left empty. Layers can be stacked with `nn.scan` (one compiled layer, a leading
`layers` axis on every block param) and wrapped in `nn.remat`.

Decoding (`cache_index` given) runs the same modules over the new tokens only, with
each layer's keys and values kept in the `cache` collection (see attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.model_config import LoraConfig, ModelConfig
from jaxlm.models.attention import SelfAttention, attention_mask, cache_mask, takes_mask
from jaxlm.models.layers import MLPS, EinsumDense, logical, make_norm
from jaxlm.models.rope import rope_scaling
from jaxlm.models.stack import stack_layers


class DecoderBlock(nn.Module):
    """Pre-norm block; returns `(x, None)` so it can be scanned."""

    config: ModelConfig
    deterministic: bool = True
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        bias_B1LL: jax.Array | None,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        c = self.config.resolved()
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        out_scale = (2 * c.n_layers) ** -0.5  # GPT-2's residual-branch init scaling

        def norm(name: str) -> nn.Module:
            return make_norm(c.norm, c.layer_norm_eps, c.use_bias, dtype, param_dtype, name)

        x_BLD = x_BLD + SelfAttention(
            n_heads=c.n_heads,
            head_dim=c.head_dim,
            out_init_scale=out_scale,
            dropout=c.dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            deterministic=self.deterministic,
            n_kv_heads=c.kv_heads,
            use_bias=c.use_bias,
            rope_base=c.rope_base if c.position == "rope" else 0.0,
            rope_scaling=rope_scaling(c),
            attention=c.attention,
            sliding_window=c.sliding_window,
            lora=self.lora,
            name="attn",
        )(
            norm("ln_attn")(x_BLD),
            bias_B1LL,
            positions_BL,
            segment_ids_BL,
            cache_index=cache_index,
        )
        x_BLD = x_BLD + MLPS[c.mlp](
            ff_dim=c.ff_dim,
            out_init_scale=out_scale,
            dropout=c.dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            deterministic=self.deterministic,
            use_bias=c.use_bias,
            lora=self.lora,
            name="mlp",
        )(norm("ln_mlp")(x_BLD))
        return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), None


class Decoder(nn.Module):
    """Token ids (B, L) -> logits (B, L, V) in fp32.

    Decoding: apply with `mutable=["cache"]`, `cache_index` (the cache slot of the
    first token; a scalar) and `key_valid_BS` (True at the cache slots that hold real
    tokens, i.e. not left padding; its length is the cache's). The first call creates
    the cache; `positions_BL` are then each row's own positions, and the logits are
    the last position's only, (B, 1, V).

    `lora` (rank > 0) adds low-rank adapters to the projections it targets.
    """

    config: ModelConfig
    deterministic: bool = True
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
        cache_index: jax.Array | None = None,
        key_valid_BS: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config.resolved()
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
        x = embed(tokens_BL)
        if c.position == "learned":
            x = x + nn.Embed(
                c.max_len,
                c.d_model,
                embedding_init=logical(nn.initializers.normal(0.01), ("max_len", "embed")),
                dtype=dtype,
                param_dtype=param_dtype,
                name="pos_embed",
            )(positions_BL)
        x = nn.Dropout(c.dropout)(x, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "length", "embed"))
        mask = None  # kernels that mask from segment ids skip the (B, 1, L, L) mask
        if cache_index is not None:
            assert key_valid_BS is not None, "decoding needs key_valid_BS"
            mask = cache_mask(key_valid_BS, cache_index, tokens_BL.shape[1], c.sliding_window)
        elif takes_mask(c.attention):
            mask = attention_mask(segment_ids_BL, causal=True, window=c.sliding_window)

        args = (mask, positions_BL, segment_ids_BL)
        if cache_index is not None:
            args = (*args, cache_index)
        lora = self.lora if self.lora is not None and self.lora.rank > 0 else None
        x = stack_layers(DecoderBlock, c, self.deterministic, x, *args, lora=lora)
        if cache_index is not None:  # decoding samples from the last position only
            x = x[:, -1:]

        x = make_norm(c.norm, c.layer_norm_eps, c.use_bias, dtype, param_dtype, "ln_final")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = EinsumDense(
                "bld,dv->blv",
                (c.d_model, c.vocab_size),
                ("embed", "vocab"),
                dtype=dtype,
                param_dtype=param_dtype,
                name="lm_head",
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)
