"""Self-attention: multi-head, grouped-query or multi-query, with causal, document
(segment) and sliding-window masks and optional rotary positions.

`ModelConfig.attention` picks how the scores are computed: `einsum` (the reference
below), `dot_product` (`jax.nn.dot_product_attention`, which lets XLA pick a fused
kernel), `flash` or `splash` (the Pallas TPU kernels, see kernels.py). All give the same
numbers.

Decoding keeps a KV cache in the flax `cache` collection: keys and values per layer,
preallocated to a length S, written at `cache_index` and attended through a (B, 1, T,
S) mask (`cache_mask`), so one compiled step serves every position up to S
(`grow_cache` lengthens it between decoding phases).
Cross-attention caches the projected encoder keys and values once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.models.kernels import flash_attention, splash_attention
from jaxlm.models.layers import EinsumDense
from jaxlm.models.rope import RopeScaling, apply_rope

# The implementations that take a (B, 1, L, L) mask or bias; the others build their
# masks from segment ids themselves, so the decoder skips the L x L mask for them.
BIAS_ATTENTION = ("einsum", "dot_product")
# Keys and values both cached heads first, (B, K, S, H). Keys stored transposed,
# (B, K, H, S), spared XLA a transposed copy per step once, but in today's decoding
# loop the (S, H) keys are the faster operand: GPT-2 small steps 1.02-1.08x at 8 rows
# and 1.04-1.13x at 1 (the score dot at 160 slots: 283 against 360 us a layer), and the
# new key is written as one contiguous row instead of a strided column.
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def uses_bias(attention: str) -> bool:
    return attention in BIAS_ATTENTION


NEG_INF = float(jnp.finfo(jnp.float32).min)  # finite, so fully masked rows stay finite


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


def masked_scores(scores: jax.Array, bias: jax.Array) -> jax.Array:
    """Scores with a boolean mask (masked out -> NEG_INF) or an additive fp32 bias
    (T5's relative positions) applied. A mask is the faster of the two on CPU: a
    select fuses into the softmax, and the backward pass has no bias term to carry
    (2x faster attention fwd+bwd at GPT-2 tiny's shapes, benchmarks/README.md)."""
    if bias.dtype == jnp.bool_:
        return jnp.where(bias, scores, NEG_INF)
    return scores + bias


# Query rows per block of causal attention: block i of the queries attends only keys
# [0, (i + 1) * CAUSAL_BLOCK), so the products skip the masked upper triangle.
CAUSAL_BLOCK = 128


def dot_product_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    bias_B1LL: jax.Array,
    scale: float | None = None,
    causal: bool = False,
) -> jax.Array:
    """The einsum reference: softmax in fp32 whatever the compute dtype.

    `bias_B1LL` is a boolean mask (`attention_mask`) or an additive bias. Query heads
    are grouped onto the K key/value heads (query head n reads kv head n // (N // K)),
    and each group's queries become rows of one (G * L, H) x (H, S) product per kv
    head, heads first: XLA's CPU batched dots run about twice as fast in that layout
    as with heads between length and head_dim. Keys may be longer or shorter than
    queries (cross-attention), and the bias may be per head, (B, N, Lq, Lk), when
    K == N (T5's relative position bias). `scale` None is 1/sqrt(head_dim); T5 passes
    1.0 (it folds the scale into init).

    `causal` says the mask hides every key after its query; then queries go in blocks
    of CAUSAL_BLOCK that skip the keys no row of the block may see (GPT-2 small's
    attention fwd+bwd 318 -> 209 ms a layer). Masked keys add exactly 0 to a softmax,
    so only the summation order changes.
    """
    b, length, n_heads, head_dim = q_BLNH.shape
    k_len, k_heads = k_BLKH.shape[1], k_BLKH.shape[2]
    group = n_heads // k_heads
    q_BKGLH = q_BLNH.reshape(b, length, k_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BLKH.transpose(0, 2, 1, 3), v_BLKH.transpose(0, 2, 1, 3)
    scale = head_dim**-0.5 if scale is None else scale
    bias_BKGLS = _grouped(bias_B1LL, k_heads)
    step = CAUSAL_BLOCK if causal and length == k_len and length % CAUSAL_BLOCK == 0 else length
    outs = []
    for start in range(0, length, step):
        end = start + step
        keys = end if step < length else k_len
        outs.append(
            _attend_rows(
                q_BKGLH[:, :, :, start:end],
                k_BKSH[:, :, :keys],
                v_BKSH[:, :, :keys],
                bias_BKGLS[..., start:end, :keys],
                scale,
            )
        )
    out_BKGLH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(b, length, n_heads, head_dim)


def _attend_rows(
    q_BKGTH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, bias: jax.Array, scale: float
) -> jax.Array:
    """T query rows per group against S keys, each group's rows as one product."""
    b, k_heads, group, t, head_dim = q_BKGTH.shape
    k_len = k_BKSH.shape[2]
    q_BKQH = q_BKGTH.reshape(b, k_heads, group * t, head_dim)
    scores = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH).astype(jnp.float32) * scale
    scores = scores.reshape(b, k_heads, group, t, k_len)
    probs = jax.nn.softmax(masked_scores(scores, bias), axis=-1)
    probs = probs.astype(v_BKSH.dtype).reshape(b, k_heads, group * t, k_len)
    out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs, v_BKSH)
    return out_BKQH.reshape(b, k_heads, group, t, head_dim)


def _grouped(bias: jax.Array, k_heads: int) -> jax.Array:
    """A (B, 1, T, S) or per-head (B, N, T, S) bias or mask as (B, K|1, G|1, T, S)."""
    if bias.shape[1] == 1:
        return bias[:, :, None]
    b, n, t, s = bias.shape
    return bias.reshape(b, k_heads, n // k_heads, t, s)


def _cache_layout(x_BLKH: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BLKH.transpose(0, 2, 1, 3), CACHE_AXES)


def grow_cache(cache: Any, length: int) -> Any:
    """A decoder's self-attention KV cache (the `cache` collection) with every key and
    value padded with empty slots to `length`, so decoding can go on attending only the
    slots written so far plus the next few (`jaxlm.generation.programs`). Not for
    cross-attention caches, whose length is the source's."""

    def grow(x: jax.Array) -> jax.Array:
        axis = x.ndim - len(CACHE_AXES) + CACHE_AXES.index("length")  # scans lead with layers
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)

    return jax.tree_util.tree_map(grow, cache)


def cached_attention(
    q_BTNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    bias: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """The einsum reference for T queries over a cache of keys and values (B, K, S,
    H); `bias` is a (B, 1, T, S) mask or bias, or per head (B, N, T, S). Same
    arithmetic as `dot_product_attention`."""
    b, t, n_heads, head_dim = q_BTNH.shape
    k_heads = k_BKSH.shape[1]
    group = n_heads // k_heads
    q_BKGTH = q_BTNH.reshape(b, t, k_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    scale = head_dim**-0.5 if scale is None else scale
    scores = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH).astype(jnp.float32) * scale
    probs = jax.nn.softmax(masked_scores(scores, _grouped(bias, k_heads)), axis=-1)
    probs = probs.astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("bkgts,bksh->bkgth", probs, v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n_heads, head_dim)


def xla_dot_product_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    bias_B1LL: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` with the reference's mask or bias and scale.

    It groups query heads onto kv heads itself (same n // (N // K) order) and keeps the
    softmax in fp32, so it matches the reference while leaving fusion to XLA.
    """
    mask = bias_B1LL if bias_B1LL.dtype == jnp.bool_ else None
    bias = None if mask is not None else bias_B1LL
    return jax.nn.dot_product_attention(
        q_BLNH, k_BLKH, v_BLKH, bias=bias, mask=mask, scale=scale, implementation="xla"
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
    attention: str = "einsum"  # einsum | dot_product | flash | splash
    sliding_window: int = 0  # for splash, which masks by itself; the others get it in the bias
    scale: float | None = None  # of the scores; None = 1/sqrt(head_dim), T5 uses 1.0
    query_init_scale: float = 1.0  # T5 folds the 1/sqrt(head_dim) into the query's init
    causal: bool = False  # self-attention whose mask hides later keys (the einsum path skips them)

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        bias_B1LL: jax.Array | None,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        kv_BSD: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """`bias_B1LL` (a mask from `attention_mask`, or a bias) for einsum and
        dot_product; the kernels read `segment_ids_BL` instead (None = one document per
        row), always causal.
        `kv_BSD` (einsum and dot_product only) makes it cross-attention: keys and values
        come from it (an encoder's output) instead of `x_BLD`.

        `cache_index` (a scalar) turns on decoding: the new keys and values go into the
        `cache` collection at that slot, and the queries attend over the whole cache
        through `bias_B1LL` (B, 1, T, S) from `cache_mask`; cross-attention keys and
        values are projected on the first call and read from the cache after."""
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
            return nn.with_logical_constraint(y, ("batch", "length", axis, "head_dim"))

        k_heads = self.n_kv_heads or self.n_heads
        rope = self.rope_base > 0
        q_BLNH = project("query", self.n_heads, "heads", rotate=rope)
        source = x_BLD if kv_BSD is None else kv_BSD
        if cache_index is not None:
            out_BLNH = self._decode(q_BLNH, bias_B1LL, cache_index, kv_BSD, project)
        else:
            k_BLKH = project("key", k_heads, "kv_heads", rope and kv_BSD is None, source)
            v_BLKH = project("value", k_heads, "kv_heads", False, source)
            out_BLNH = self._attend(q_BLNH, k_BLKH, v_BLKH, bias_B1LL, segment_ids_BL)
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
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)

    def _attend(
        self,
        q_BLNH: jax.Array,
        k_BLKH: jax.Array,
        v_BLKH: jax.Array,
        bias_B1LL: jax.Array | None,
        segment_ids_BL: jax.Array | None,
    ) -> jax.Array:
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(q_BLNH.shape[:2], jnp.int32)
        if self.attention == "flash":
            return flash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
        if self.attention == "splash":
            return splash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, self.sliding_window)
        if self.attention == "dot_product":
            return xla_dot_product_attention(q_BLNH, k_BLKH, v_BLKH, bias_B1LL, self.scale)
        return dot_product_attention(q_BLNH, k_BLKH, v_BLKH, bias_B1LL, self.scale, self.causal)

    def _decode(
        self,
        q_BTNH: jax.Array,
        bias_B1TS: jax.Array,
        cache_index: jax.Array,
        kv_BSD: jax.Array | None,
        project: Callable[..., jax.Array],
    ) -> jax.Array:
        """Attention over the cache. Self-attention writes the new keys and values at
        `cache_index` first; cross-attention projects the encoder output on the first
        call only. `project(name, heads, axis, rotate, source)` is the caller's."""
        k_heads = self.n_kv_heads or self.n_heads
        cross = kv_BSD is not None
        if cross and self.has_variable("cache", "cached_key"):
            k_BKSH = self.get_variable("cache", "cached_key")
            v_BKSH = self.get_variable("cache", "cached_value")
        elif cross:
            k_BKSH = _cache_layout(project("key", k_heads, "kv_heads", False, kv_BSD))
            v_BKSH = _cache_layout(project("value", k_heads, "kv_heads", False, kv_BSD))
            self.put_variable("cache", "cached_key", k_BKSH)
            self.put_variable("cache", "cached_value", v_BKSH)
        else:
            cache_len = bias_B1TS.shape[-1]
            rope = self.rope_base > 0
            k_BTKH = project("key", k_heads, "kv_heads", rope)
            v_BTKH = project("value", k_heads, "kv_heads", False)
            k_BKSH = self._cached("cached_key", _cache_layout(k_BTKH), cache_index, cache_len)
            v_BKSH = self._cached("cached_value", _cache_layout(v_BTKH), cache_index, cache_len)
        return cached_attention(q_BTNH, k_BKSH, v_BKSH, bias_B1TS, self.scale)

    def _cached(
        self, name: str, new_BKTH: jax.Array, cache_index: jax.Array, cache_len: int
    ) -> jax.Array:
        """Write the T new entries at slot `cache_index` of a cache `cache_len` slots
        long; the whole cache, new entries included, is what the queries attend to."""
        b, k_heads, _, head_dim = new_BKTH.shape
        shape = (b, k_heads, cache_len, head_dim)
        cache = self.variable("cache", name, jnp.zeros, shape, new_BKTH.dtype)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
        updated = jax.lax.dynamic_update_slice(cache.value, new_BKTH, start)
        cache.value = nn.with_logical_constraint(updated, CACHE_AXES)
        return cache.value
