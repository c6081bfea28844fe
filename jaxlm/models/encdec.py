"""A T5-style encoder-decoder (T5 v1.0, the shape of t5-small) as Flax Linen modules.

What makes it T5 and not a GPT-2 turned sideways:

- one token embedding shared by the encoder, the decoder and the (tied) LM head, whose
  input is scaled by d_model**-0.5 first, as T5 does;
- T5's LayerNorm: RMS only, no mean subtraction, no bias (flax's RMSNorm), pre-norm
  blocks and a final norm per stack;
- no position embeddings: a learned scalar bias per head, indexed by the bucketed
  relative distance key - query (32 buckets, exact below 8 or 16, log-spaced up to
  128), bidirectional in the encoder and causal in the decoder. Each stack's table
  lives in its first layer and is reused by every later layer;
- no biases anywhere, a ReLU MLP, and no 1/sqrt(head_dim) on the scores (T5 folds it
  into the query's initialisation).

T5 v1.1 / flan-t5 are options of the same model: `mlp=geglu` (the gated tanh-GELU),
`tie_embeddings=false` (a separate head, no rescaling) and `d_kv` (heads narrower or
wider than d_model / n_heads); jaxlm/hf/t5.py maps both to Hugging Face's T5.

The layers are an unrolled Python loop, not `nn.scan`: the first layer owns the shared
relative-bias table, so the layers are not all alike. `remat` still wraps each block.
Dropout, when configured, follows T5 (embeddings, each residual branch, final norm).

`encode`, `decode` and `__call__` are all usable through `model.apply(..., method=...)`;
masks are (B, L) with 1 (True) at real tokens and 0 at padding. `decode` with a
`cache_index` decodes incrementally: the decoder's self-attention keys and values and
the cross-attention's projected encoder output live in the `cache` collection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.model_config import ModelConfig
from jaxlm.models.attention import SelfAttention
from jaxlm.models.layers import INIT_STD, MLPS, EinsumDense, logical, rms_norm
from jaxlm.models.stack import remat_policy

NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite, so a fully padded row stays finite


def relative_position_bucket(
    relative_BLS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative distance (key position - query position).

    Bidirectional: half the buckets for keys after the query, half for keys before.
    Within a half, the first half of the buckets are exact distances and the rest
    grow logarithmically up to `max_distance`, beyond which all share the last one.
    Causal: only keys at or before the query count (later ones fall in bucket 0, and
    the causal mask hides them anyway).
    """
    bucket = jnp.zeros_like(relative_BLS)
    n = -relative_BLS  # distance back from the query
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(relative_BLS.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # max(n, 1) keeps log() finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_BLS.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """The learned (buckets, heads) table, looked up as a (1, N, Lq, Lk) fp32 bias."""

    n_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    init_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
        """`q_offset`: the position of the first query (decoding from a cache)."""
        table = self.param(
            "embedding",
            logical(nn.initializers.normal(self.init_std), ("relpos_buckets", "heads")),
            (self.num_buckets, self.n_heads),
            self.param_dtype,
        )
        relative = jnp.arange(k_len)[None, :] - (q_offset + jnp.arange(q_len))[:, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        bias_LSN = jnp.take(table, buckets, axis=0).astype(jnp.float32)
        return jnp.transpose(bias_LSN, (2, 0, 1))[None]


class T5Block(nn.Module):
    """Pre-norm: self-attention, (decoder) cross-attention, ReLU MLP, each residual.

    The first block of a stack (`owns_relative_bias`) builds the self-attention bias
    (relative positions where `self_mask` allows, NEG_INF elsewhere) and returns it,
    so later blocks reuse it: one table per stack, as T5.
    """

    config: ModelConfig
    causal: bool
    owns_relative_bias: bool
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        self_mask_B1LL: jax.Array,
        self_bias_BNLL: jax.Array | None,
        enc_BSD: jax.Array | None,
        cross_bias_B1LS: jax.Array | None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if self.owns_relative_bias:
            position_1NLL = RelativePositionBias(
                c.n_heads,
                c.relative_buckets,
                c.relative_max_distance,
                bidirectional=not self.causal,
                init_std=c.d_model**-0.5,
                param_dtype=param_dtype,
                name="relpos",
            )(x_BLD.shape[1], self_mask_B1LL.shape[-1], 0 if cache_index is None else cache_index)
            self_bias_BNLL = jnp.where(self_mask_B1LL, position_1NLL, NEG_INF)
        assert self_bias_BNLL is not None, "the first block owns the relative bias"

        def norm(name: str) -> nn.Module:
            return rms_norm(c.layer_norm_eps, dtype, param_dtype, name)

        def attention(name: str) -> SelfAttention:
            return SelfAttention(
                n_heads=c.n_heads,
                head_dim=c.head_dim,
                out_init_scale=1.0,
                dropout=c.dropout,
                dtype=dtype,
                param_dtype=param_dtype,
                deterministic=self.deterministic,
                use_bias=False,
                attention=c.attention,
                scale=1.0,
                query_init_scale=c.head_dim**-0.5,
                name=name,
            )

        x_BLD = x_BLD + attention("self_attn")(
            norm("ln_self_attn")(x_BLD), self_bias_BNLL, cache_index=cache_index
        )
        if enc_BSD is not None:
            x_BLD = x_BLD + attention("cross_attn")(
                norm("ln_cross_attn")(x_BLD),
                cross_bias_B1LS,
                kv_BSD=enc_BSD,
                cache_index=cache_index,
            )
        x_BLD = x_BLD + MLPS[c.mlp](
            ff_dim=c.ff_dim,
            out_init_scale=1.0,
            dropout=c.dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            deterministic=self.deterministic,
            use_bias=False,
            name="mlp",
        )(norm("ln_mlp")(x_BLD))
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
        return x_BLD, self_bias_BNLL


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) layers and
    their final norm, on already embedded inputs."""

    config: ModelConfig
    causal: bool
    n_layers: int
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        mask_BL: jax.Array,
        enc_BSD: jax.Array | None = None,
        enc_mask_BS: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """`mask_BL` masks the keys: the inputs, or with `cache_index` the cache's slots."""
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        q_len, k_len = x_BLD.shape[1], mask_BL.shape[1]
        keep = mask_BL.astype(bool)
        self_mask = jnp.broadcast_to(keep[:, None, None, :], (keep.shape[0], 1, q_len, k_len))
        if self.causal:
            if cache_index is None:
                causal = jnp.tril(jnp.ones((q_len, k_len), bool))
            else:
                causal = jnp.arange(k_len)[None, :] <= cache_index + jnp.arange(q_len)[:, None]
            self_mask = self_mask & causal[None, None]
        cross_bias = None
        if enc_BSD is not None:
            assert enc_mask_BS is not None
            cross_bias = jnp.where(enc_mask_BS.astype(bool), 0.0, NEG_INF)[:, None, None, :]
            cross_bias = cross_bias.astype(jnp.float32)

        block = T5Block
        if c.remat != "none":
            block = nn.remat(block, policy=remat_policy(c.remat, c.remat_offload))
        bias = None
        for i in range(self.n_layers):
            x_BLD, bias = block(c, self.causal, i == 0, self.deterministic, name=f"layers_{i}")(
                x_BLD, self_mask, bias, enc_BSD, cross_bias, cache_index
            )
        x_BLD = rms_norm(c.layer_norm_eps, dtype, param_dtype, "ln_final")(x_BLD)
        x_BLD = nn.Dropout(c.dropout)(x_BLD, deterministic=self.deterministic)
        return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


class T5(nn.Module):
    """Source and target token ids -> target logits (B, Lt, V) in fp32.

    `tgt_in` is the decoder's input (the target shifted right, starting with the
    decoder start token); None uses `src` itself, so `init(rng, tokens)` works with one
    argument as for the decoder-only models.
    """

    config: ModelConfig
    deterministic: bool = True

    def setup(self) -> None:
        c = self.c
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.encoder = T5Stack(c, False, c.n_layers, self.deterministic)
        self.decoder = T5Stack(c, True, c.n_decoder_layers or c.n_layers, self.deterministic)
        self.dropout = nn.Dropout(c.dropout)
        if not c.tie_embeddings:  # T5 v1.1's separate head, without the rescaling
            self.lm_head = EinsumDense(
                "bld,dv->blv",
                (c.d_model, c.vocab_size),
                ("embed", "vocab"),
                init_scale=c.d_model**-0.5 / INIT_STD,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    @property
    def c(self) -> ModelConfig:
        return self.config.resolved()

    def _embed(self, tokens_BL: jax.Array) -> jax.Array:
        x = self.dropout(self.embed(tokens_BL), deterministic=self.deterministic)
        return nn.with_logical_constraint(x.astype(self.c.dtype), ("batch", "length", "embed"))

    def encode(self, src_BS: jax.Array, src_mask_BS: jax.Array | None = None) -> jax.Array:
        """Encoder output (B, S, D) in the compute dtype."""
        if src_mask_BS is None:
            src_mask_BS = jnp.ones_like(src_BS)
        return self.encoder(self._embed(src_BS), src_mask_BS)

    def decode(
        self,
        tgt_in_BL: jax.Array,
        enc_BSD: jax.Array,
        src_mask_BS: jax.Array | None = None,
        tgt_mask_BL: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """Logits (B, L, V) in fp32 for the decoder input given the encoder output.

        Decoding: apply with `mutable=["cache"]` and `cache_index` (the cache slot of
        `tgt_in_BL`'s first token); `tgt_mask_BL` is then required and masks the cache's
        slots (B, cache length). The first call fills the cross-attention cache from
        `enc_BSD`; later calls read it (and ignore `enc_BSD`'s values).
        """
        if src_mask_BS is None:
            src_mask_BS = jnp.ones(enc_BSD.shape[:2], jnp.int32)
        if tgt_mask_BL is None:
            assert cache_index is None, "decoding needs the cache's slot mask as tgt_mask_BL"
            tgt_mask_BL = jnp.ones_like(tgt_in_BL)
        x = self.decoder(
            self._embed(tgt_in_BL), tgt_mask_BL, enc_BSD, src_mask_BS, cache_index=cache_index
        )
        if self.c.tie_embeddings:
            # T5's tied head rescales the decoder output before the shared embedding.
            logits = self.embed.attend(x * self.c.d_model**-0.5)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)

    def __call__(
        self,
        src_BS: jax.Array,
        tgt_in_BL: jax.Array | None = None,
        src_mask_BS: jax.Array | None = None,
        tgt_mask_BL: jax.Array | None = None,
    ) -> jax.Array:
        if tgt_in_BL is None:
            tgt_in_BL = src_BS
        enc = self.encode(src_BS, src_mask_BS)
        return self.decode(tgt_in_BL, enc, src_mask_BS, tgt_mask_BL)
