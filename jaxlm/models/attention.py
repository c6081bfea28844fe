"""Self-attention: multi-head, grouped-query or multi-query, with causal, document
(segment) and sliding-window masks and optional rotary positions.

`ModelConfig.attention` picks how the scores are computed: `einsum` (the reference
below, which every other implementation is tested against), `dot_product`
(`jax.nn.dot_product_attention`, which leaves fusion to XLA), `flash` or `splash`
(the Pallas TPU kernels, kernels.py), or `auto`, which `resolve_attention` turns into
the platform's best. All give the same numbers.

Decoding keeps a KV cache in the flax `cache` collection: keys and values per layer,
laid out like the keys of a training step, preallocated to a length S, written at
`cache_index` and attended through a (B, 1, T, S) mask (`cache_mask`), so one compiled
step serves every position up to S. Cross-attention caches the projected encoder keys
and values once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxlm.model_config import FAMILIES, LoraConfig, ModelConfig
from jaxlm.models.kernels import LANES, flash_attention, splash_attention, splash_fits
from jaxlm.models.layers import EinsumDense
from jaxlm.models.rope import RopeScaling, apply_rope

# The implementations that take a (B, 1, L, L) mask or bias; the kernels build their
# masks from segment ids themselves, so the decoder skips the L x L mask for them.
MASK_TAKING = ("einsum", "dot_product")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite, so fully masked rows stay finite


def resolve_attention(config: ModelConfig, platform: str, seq_len: int | None = None) -> str:
    """The implementation `config.attention` means on `platform` (tpu, gpu, cpu) for
    rows of `seq_len` tokens (None: not known, taken to tile).

    `auto` is the splash kernel on TPU for causal self-attention whose heads and rows
    it can tile (T5's relative bias and BERT's bidirectional mask take `dot_product`),
    `jax.nn.dot_product_attention` on GPU, and the einsum reference on CPU, which was
    the fastest path there (benchmarks/README.md)."""
    if config.attention != "auto":
        return config.attention
    c = config.resolved()
    if platform == "tpu":
        causal_self = FAMILIES[c.family].kind == "decoder"
        tiles = splash_fits(c.head_dim) and (seq_len is None or seq_len % LANES == 0)
        return "splash" if causal_self and tiles else "dot_product"
    return "dot_product" if platform in ("gpu", "cuda", "rocm") else "einsum"


def takes_mask(attention: str) -> bool:
    """Does `attention` read an L x L mask (the kernels read segment ids instead)?"""
    return attention in MASK_TAKING


def attention_mask(segment_ids_BL: jax.Array, causal: bool = True, window: int = 0) -> jax.Array:
    """Boolean (B, 1, L, L): True where a query may attend a key.

    Tokens attend only within their own segment, so packed documents stay apart; with
    `window` > 0, only to keys fewer than `window` positions away (Mistral's sliding
    window: a causal query sees itself and the window - 1 tokens before it).
    """
    same = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    length = segment_ids_BL.shape[1]
    query, key = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    if causal:
        same = same & (key <= query)[None]
    if window:
        same = same & (jnp.abs(query - key) < window)[None]
    return same[:, None]


def attention_bias(segment_ids_BL: jax.Array, causal: bool = True, window: int = 0) -> jax.Array:
    """`attention_mask` as an additive fp32 bias: 0 where allowed, else a large finite
    negative (fully padded rows stay finite instead of NaN)."""
    return jnp.where(attention_mask(segment_ids_BL, causal, window), 0.0, NEG_INF)


def cache_mask(
    key_valid_BS: jax.Array, cache_index: jax.Array, q_len: int, window: int = 0
) -> jax.Array:
    """Boolean (B, 1, T, S) for T queries written at cache slots `cache_index`.. over
    the S cache slots: a query sees the valid (non-padding) slots at or before its own,
    and with `window` > 0 only the `window` latest of them. Prompts are left-padded, so
    slot distance is position distance for real tokens."""
    query = cache_index + jnp.arange(q_len)[:, None]
    key = jnp.arange(key_valid_BS.shape[1])[None, :]
    ok = key_valid_BS.astype(bool)[:, None, :] & (key <= query)[None]
    if window:
        ok = ok & (query - key < window)[None]
    return ok[:, None]


def attention_probs(
    q_BTNH: jax.Array, k_BSKH: jax.Array, mask: jax.Array, scale: float | None = None
) -> jax.Array:
    """The reference's attention probabilities, fp32 (B, K, G, T, S): query head
    k * G + g over the keys; see `einsum_attention` for the arguments."""
    b, t, n_heads, head_dim = q_BTNH.shape
    k_heads = k_BSKH.shape[2]
    group = n_heads // k_heads
    q_BTKGH = q_BTNH.reshape(b, t, k_heads, group, head_dim)
    scale = head_dim**-0.5 if scale is None else scale
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH).astype(jnp.float32) * scale
    if mask.shape[1] == 1:  # one mask for every head
        mask = mask[:, :, None]
    else:  # per head: (B, N, T, S) -> (B, K, G, T, S)
        mask = mask.reshape(mask.shape[0], k_heads, group, *mask.shape[2:])
    scores = jnp.where(mask, scores, NEG_INF) if mask.dtype == jnp.bool_ else scores + mask
    return jax.nn.softmax(scores, axis=-1)


def einsum_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """The reference: one masked softmax over the whole T x S square, in fp32.

    `mask` is a boolean (B, 1, T, S) (True = may attend) or an additive fp32 bias,
    (B, 1, T, S) or per head (B, N, T, S) (T5's relative positions). Query head n reads
    kv head n // (N // K). `scale` None is 1/sqrt(head_dim); T5 passes 1.0.
    """
    b, t, n_heads, head_dim = q_BTNH.shape
    probs = attention_probs(q_BTNH, k_BSKH, mask, scale).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH).reshape(b, t, n_heads, head_dim)


def jax_dot_product_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` with the reference's mask or bias and scale, in
    its XLA implementation (it groups query heads onto kv heads the same way)."""
    boolean = mask.dtype == jnp.bool_
    return jax.nn.dot_product_attention(
        q_BLNH,
        k_BLKH,
        v_BLKH,
        bias=None if boolean else mask,
        mask=mask if boolean else None,
        scale=scale,
    )


class SelfAttention(nn.Module):
    """Projections to N query and K key/value heads (K divides N), attention, output.

    `rope_base` > 0 rotates queries and keys by `positions` (RoPE); 0 leaves positions
    to a learned table added to the embeddings.
    """

    n_heads: int
    head_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    n_kv_heads: int = 0  # 0 = n_heads
    use_bias: bool = True
    rope_base: float = 0.0
    rope_scaling: RopeScaling | None = None  # a checkpoint's context extension
    attention: str = "einsum"  # einsum | dot_product | flash | splash (resolved, not auto)
    sliding_window: int = 0  # for splash, which masks by itself; the others get it in the mask
    scale: float | None = None  # of the scores; None = 1/sqrt(head_dim), T5 uses 1.0
    query_init_scale: float = 1.0  # T5 folds the 1/sqrt(head_dim) into the query's init
    lora: LoraConfig | None = None  # adapters on the projections it targets

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        mask: jax.Array | None,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        kv_BSD: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """`mask` (from `attention_mask`, or an additive bias) for einsum and
        dot_product; the kernels read `segment_ids_BL` instead (None = one document per
        row), always causal.
        `kv_BSD` (einsum and dot_product only) makes it cross-attention: keys and values
        come from it (an encoder's output) instead of `x_BLD`.

        `cache_index` (a scalar) turns on decoding: the new keys and values go into the
        `cache` collection at that slot, and the queries attend over the whole cache
        through `mask` (B, 1, T, S) from `cache_mask`; cross-attention keys and values
        are projected on the first call and read from the cache after."""
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kw |= dict(lora=self.lora, deterministic=self.deterministic)
        if positions_BL is None:  # one unpacked document per row
            positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])

        def project(
            name: str, heads: int, axis: str, rotate: bool, source: jax.Array = x_BLD
        ) -> jax.Array:
            y = EinsumDense(
                "bld,dnh->blnh",
                (d_model, heads, self.head_dim),
                ("embed", axis, "head_dim"),
                (axis, "head_dim") if self.use_bias else (),
                self.query_init_scale if name == "query" else 1.0,
                name=name,
                **kw,
            )(source)
            if rotate:
                y = apply_rope(y, positions_BL, self.rope_base, self.rope_scaling)
            y = checkpoint_name(y, f"{name}_proj")  # query_proj, key_proj, value_proj
            return nn.with_logical_constraint(y, ("batch", "length", axis, "head_dim"))

        k_heads = self.n_kv_heads or self.n_heads
        rope = self.rope_base > 0
        q_BLNH = project("query", self.n_heads, "heads", rotate=rope)
        source = x_BLD if kv_BSD is None else kv_BSD
        if cache_index is not None:
            out_BLNH = self._decode(q_BLNH, mask, cache_index, kv_BSD, project)
        else:
            k_BLKH = project("key", k_heads, "kv_heads", rope and kv_BSD is None, source)
            v_BLKH = project("value", k_heads, "kv_heads", False, source)
            out_BLNH = self._attend(q_BLNH, k_BLKH, v_BLKH, mask, segment_ids_BL)
            out_BLNH = checkpoint_name(out_BLNH, "context")
        out_BLNH = nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "head_dim"))
        out = EinsumDense(
            "blnh,nhd->bld",
            (self.n_heads, self.head_dim, d_model),
            ("heads", "head_dim", "embed"),
            ("embed",) if self.use_bias else (),
            self.out_init_scale,
            name="out",
            **kw,
        )(out_BLNH)
        out = checkpoint_name(out, "out_proj")
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)

    def _attend(
        self,
        q_BLNH: jax.Array,
        k_BLKH: jax.Array,
        v_BLKH: jax.Array,
        mask: jax.Array | None,
        segment_ids_BL: jax.Array | None,
    ) -> jax.Array:
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(q_BLNH.shape[:2], jnp.int32)
        if self.is_mutable_collection("intermediates"):  # maps asked for: not the default path
            self._sow_maps(q_BLNH, k_BLKH, mask, segment_ids_BL)
        if self.attention == "flash":
            return flash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
        if self.attention == "splash":
            return splash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, self.sliding_window)
        if self.attention == "dot_product":
            return jax_dot_product_attention(q_BLNH, k_BLKH, v_BLKH, mask, self.scale)
        return einsum_attention(q_BLNH, k_BLKH, v_BLKH, mask, self.scale)

    def _sow_maps(self, q_BLNH, k_BLKH, mask, segment_ids_BL) -> None:
        """Sow the attention probabilities (B, N, T, S) as `intermediates/attention`,
        computed by the reference from the same q, k and mask whichever implementation
        runs; the kernels' mask (causal, by segment and window) is built here."""
        if mask is None:
            mask = attention_mask(segment_ids_BL, causal=True, window=self.sliding_window)
        probs = attention_probs(q_BLNH, k_BLKH, mask, self.scale)
        b, t, n = q_BLNH.shape[:3]
        self.sow("intermediates", "attention", probs.reshape(b, n, t, k_BLKH.shape[1]))

    def _decode(
        self,
        q_BTNH: jax.Array,
        mask_B1TS: jax.Array,
        cache_index: jax.Array,
        kv_BSD: jax.Array | None,
        project: Callable[..., jax.Array],
    ) -> jax.Array:
        """Attention over the cache. Self-attention writes the new keys and values at
        `cache_index` first; cross-attention projects the encoder output on the first
        call only. `project(name, heads, axis, rotate, source)` is the caller's."""
        k_heads = self.n_kv_heads or self.n_heads
        if kv_BSD is not None and self.has_variable("cache", "cached_key"):
            k_BSKH = self.get_variable("cache", "cached_key")
            v_BSKH = self.get_variable("cache", "cached_value")
        elif kv_BSD is not None:
            k_BSKH = project("key", k_heads, "kv_heads", False, kv_BSD)
            v_BSKH = project("value", k_heads, "kv_heads", False, kv_BSD)
            self.put_variable("cache", "cached_key", k_BSKH)
            self.put_variable("cache", "cached_value", v_BSKH)
        else:
            cache_len = mask_B1TS.shape[-1]
            k_BTKH = project("key", k_heads, "kv_heads", self.rope_base > 0)
            v_BTKH = project("value", k_heads, "kv_heads", False)
            k_BSKH = self._cached("cached_key", k_BTKH, cache_index, cache_len)
            v_BSKH = self._cached("cached_value", v_BTKH, cache_index, cache_len)
        return einsum_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, self.scale)

    def _cached(
        self, name: str, new_BTKH: jax.Array, cache_index: jax.Array, cache_len: int
    ) -> jax.Array:
        """Write the T new entries at slot `cache_index` of a cache `cache_len` slots
        long; the whole cache, new entries included, is what the queries attend to."""
        b, _, k_heads, head_dim = new_BTKH.shape
        shape = (b, cache_len, k_heads, head_dim)
        cache = self.variable("cache", name, jnp.zeros, shape, new_BTKH.dtype)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
        updated = jax.lax.dynamic_update_slice(cache.value, new_BTKH, start)
        cache.value = nn.with_logical_constraint(updated, KV_AXES)
        return cache.value
