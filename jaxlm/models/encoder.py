"""BERT: a bidirectional post-LayerNorm encoder with its pretraining heads (MLM + NSP),
or the extractive QA head (`model.head=qa`).

Plain Flax Linen, no knowledge of training: `BertForPreTraining` maps token ids (and
optionally token-type ids, segment ids and positions) to fp32 masked-LM logits
(B, L, V) and next-sentence logits (B, 2). The parameter tree splits as Hugging
Face's `BertForPreTraining` does: `encoder` (embeddings, blocks, pooler: BertModel),
`mlm` and `nsp`, so the encoder's count can be read off its own subtree.

Attention is the decoder's `SelfAttention` with a non-causal mask from segment ids:
a token attends every token of its own segment, so a 0/1 attention mask used as
segment ids keeps padding (segment 0) out of the real tokens' outputs, and packed
sequences stay apart. Blocks stack with `nn.scan` and `nn.remat` exactly as in the
decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.model_config import ModelConfig
from jaxlm.models.attention import SelfAttention, attention_mask
from jaxlm.models.layers import EinsumDense, GeluMlp, layer_norm, logical
from jaxlm.models.stack import stack_layers

BERT_INIT_STD = 0.02  # BERT's initializer_range, for every table and kernel


class ErfGeluMlp(GeluMlp):
    """BERT's feed-forward: GPT-2's two matrices with the exact (erf) GELU, not tanh's."""

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.gelu(h, approximate=False)


class EncoderBlock(nn.Module):
    """Post-LN block (BERT): x = LN(x + attn(x)); x = LN(x + mlp(x)). Returns (x, None)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x_BLD: jax.Array, bias_B1LL: jax.Array, positions_BL: jax.Array
    ) -> tuple[jax.Array, None]:
        c = self.config.resolved()
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, deterministic=self.deterministic)
        attn = SelfAttention(
            n_heads=c.n_heads,
            head_dim=c.head_dim,
            out_init_scale=1.0,  # BERT scales no residual branch
            dropout=c.dropout,
            n_kv_heads=c.kv_heads,
            use_bias=c.use_bias,
            attention=c.attention,
            name="attn",
            **kw,
        )(x_BLD, bias_B1LL, positions_BL)
        x_BLD = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_attn", c.use_bias)(
            x_BLD + attn
        )
        mlp = ErfGeluMlp(
            ff_dim=c.ff_dim,
            out_init_scale=1.0,
            dropout=c.dropout,
            use_bias=c.use_bias,
            name="mlp",
            **kw,
        )(x_BLD)
        x_BLD = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_mlp", c.use_bias)(x_BLD + mlp)
        return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), None


def _table(rows: int, width: int, axes: tuple[str, str], dtype: Any, param_dtype: Any, name: str):
    init = logical(nn.initializers.normal(BERT_INIT_STD), axes)
    return nn.Embed(
        rows, width, embedding_init=init, dtype=dtype, param_dtype=param_dtype, name=name
    )


class BertEncoder(nn.Module):
    """BertModel: embeddings (token + position + token type, then LayerNorm), post-LN
    blocks and the pooler (dense + tanh on the first, [CLS], token).

    Returns (hidden (B, L, D), pooled (B, D)) in the compute dtype; pooled is None
    without the NSP head (`model.nsp_head=false`, Hugging Face's `BertForMaskedLM`,
    which has no pooler either).
    """

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        token_type_ids_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        c = self.config.resolved()
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if token_type_ids_BL is None:  # everything is sentence A
            token_type_ids_BL = jnp.zeros_like(tokens_BL)
        if segment_ids_BL is None:  # no padding: one sequence per row
            segment_ids_BL = jnp.ones_like(tokens_BL)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

        d = c.d_model
        x = _table(c.vocab_size, d, ("vocab", "embed"), dtype, param_dtype, "embed")(tokens_BL)
        x = x + _table(c.max_len, d, ("max_len", "embed"), dtype, param_dtype, "pos_embed")(
            positions_BL
        )
        x = x + _table(
            c.type_vocab_size, d, ("type_vocab", "embed"), dtype, param_dtype, "type_embed"
        )(token_type_ids_BL)
        x = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln_embed", c.use_bias)(x)
        x = nn.Dropout(c.dropout)(x, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "length", "embed"))

        mask = attention_mask(segment_ids_BL, causal=False)
        x = stack_layers(EncoderBlock, c, self.deterministic, x, mask, positions_BL)
        if not c.nsp_head:
            return x, None

        # A D -> D dense can't name both axes `embed` (flax maps a name once per array):
        # its output is named `mlp`, column-parallel under tensor like an MLP's fc_in.
        pooled_BD = EinsumDense(
            "bd,de->be",
            (d, d),
            ("embed", "mlp"),
            ("mlp",),
            dtype=dtype,
            param_dtype=param_dtype,
            name="pooler",
        )(x[:, 0])
        pooled_BD = nn.with_logical_constraint(jnp.tanh(pooled_BD), ("batch", "embed"))
        return x, pooled_BD


class MlmHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the (tied) token table
    transposed plus a per-token output bias. Returns logits (B, L, V) in fp32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, table_VD: jax.Array) -> jax.Array:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = EinsumDense(
            "bld,de->ble",
            (c.d_model, c.d_model),
            ("embed", "mlp"),
            ("mlp",),
            dtype=dtype,
            param_dtype=param_dtype,
            name="transform",
        )(x_BLD)
        h = jax.nn.gelu(h, approximate=False)
        h = layer_norm(c.layer_norm_eps, dtype, param_dtype, "ln", c.use_bias)(h)
        logits = jnp.einsum("bld,vd->blv", h, table_VD.astype(dtype))
        bias_init = logical(nn.initializers.zeros, ("vocab",))
        out_bias = self.param("bias", bias_init, (c.vocab_size,), param_dtype)
        logits = logits + out_bias.astype(dtype)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class BertForPreTraining(nn.Module):
    """The encoder plus BERT's two pretraining heads.

    MLM: dense + GELU + LayerNorm, then the token table transposed (tied) plus an
    output bias. NSP: a 2-way classifier on the pooled [CLS] vector.
    `segment_ids_BL` is 0 on padding (an attention mask of 0/1 works as is).
    With `model.nsp_head=false` (a `BertForMaskedLM` checkpoint) there is no pooler or
    NSP head and the result is the 1-tuple `(mlm_logits,)`: MLM logits always come
    first, NSP logits second only when the head exists.
    """

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        token_type_ids_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """Returns (mlm_logits (B, L, V), nsp_logits (B, 2)), both fp32; (mlm_logits,)
        without the NSP head."""
        c = self.config.resolved()
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        encoder = BertEncoder(c, self.deterministic, name="encoder")
        x_BLD, pooled_BD = encoder(tokens_BL, token_type_ids_BL, segment_ids_BL, positions_BL)

        table_VD = nn.meta.unbox(encoder.variables["params"]["embed"]["embedding"])
        logits = MlmHead(c, name="mlm")(x_BLD, table_VD)
        if pooled_BD is None:
            return (logits.astype(jnp.float32),)

        nsp = EinsumDense(
            "bd,dc->bc", (c.d_model, 2), ("embed", "classes"), ("classes",), **kw, name="nsp"
        )(pooled_BD)
        return logits.astype(jnp.float32), nsp.astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """The encoder (no pooler, as Hugging Face's `BertForQuestionAnswering`) and
    `qa_outputs`, a d_model -> 2 dense on every token: the logits of the answer
    starting and ending there. Span decoding (evaluation/span_decoding.py) picks the
    best start <= end inside the context."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        token_type_ids_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns (start_logits (B, L), end_logits (B, L)), fp32."""
        c = dataclasses.replace(self.config.resolved(), nsp_head=False)
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        encoder = BertEncoder(c, self.deterministic, name="encoder")
        x_BLD, _ = encoder(tokens_BL, token_type_ids_BL, segment_ids_BL, positions_BL)
        logits_BLC = EinsumDense(
            "bld,dc->blc",
            (c.d_model, 2),
            ("embed", "classes"),
            ("classes",),
            dtype=dtype,
            param_dtype=param_dtype,
            name="qa_outputs",
        )(x_BLD)
        logits_BLC = logits_BLC.astype(jnp.float32)
        return logits_BLC[..., 0], logits_BLC[..., 1]
