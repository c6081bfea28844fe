"""Attention through the Pallas TPU kernels (flash and splash), interpreted off TPU.

The kernels are Mosaic custom calls: they only lower for TPU. Which branch runs is
chosen by `lax.platform_dependent` when the step is *lowered*, not by the machine the
Python runs on, so `jaxlm compile --topology ...` on a CPU host still compiles the real
kernel, while CPU tests run the same kernel in Pallas's TPU interpret mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as fa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError

LANES = 128  # the kernel's kv blocks with segment ids are whole multiples of this
BLOCK_CHOICES = (512, 256, 128)  # the largest that divides the sequence is used
# Pallas's generic interpreter (a jitted scan over the grid) rather than the TPU
# simulator (`InterpretParams()`): the simulator's io_callbacks are effects, which
# `nn.remat` refuses, and platform_dependent traces this branch even on TPU.
INTERPRET = True


def check_seq_len(length: int, attention: str) -> None:
    """Raised while tracing, so a bad length stops before anything compiles."""
    if length % LANES:
        raise ConfigError(
            "train.seq_len",
            f"model.attention={attention} needs a multiple of {LANES} (the kernel's "
            f"smallest block), not {length}",
        )


def splash_fits(head_dim: int) -> bool:
    """Can the splash kernel tile heads this wide (its lanes are 128 wide)?"""
    return head_dim <= LANES or head_dim % LANES == 0


def _block(length: int, block: int | None = None) -> int:
    """`block` if given (tests force small blocks), else the largest choice dividing
    `length`."""
    return block or next(b for b in BLOCK_CHOICES if length % b == 0)


def _block_sizes(block: int) -> fa.BlockSizes:
    return fa.BlockSizes(
        block_q=block,
        block_k_major=block,
        block_k=block,
        block_b=1,
        block_q_major_dkv=block,
        block_k_major_dkv=block,
        block_k_dkv=block,
        block_q_dkv=block,
        block_k_major_dq=block,
        block_k_dq=block,
        block_q_dq=block,
    )


def _flash(
    q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, block: int | None = None
) -> jax.Array:
    return fa.flash_attention(
        q,
        k,
        v,
        segment_ids=fa.SegmentIds(seg, seg),
        causal=True,
        sm_scale=q.shape[-1] ** -0.5,
        block_sizes=_block_sizes(_block(q.shape[2], block)),
    )


# Flash has no `interpret` argument (splash has), only the context switch, which acts on
# pallas_calls traced under it. The backward pallas_calls are traced when the gradient is
# taken, outside any `with` around the forward call, so they get it via this custom_vjp.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _interpreted(
    q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, block: int | None
) -> jax.Array:
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        return _flash(q, k, v, seg, block)


def _interpreted_fwd(q, k, v, seg, block):
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        out, pullback = jax.vjp(lambda q, k, v: _flash(q, k, v, seg, block), q, k, v)
    return out, pullback


def _interpreted_bwd(block, pullback, g):
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        return (*pullback(g), None)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def flash_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array,
    block: int | None = None,
) -> jax.Array:
    """Causal, segment-masked attention by the Pallas kernel (no sliding window), in
    blocks of `block` rows (None: the largest of BLOCK_CHOICES that divides).

    The kernel wants as many kv heads as query heads, so grouped kv heads are repeated
    (query head n reads kv head n // (N // K), as in the einsum reference).
    """
    _, length, n_heads, _ = q_BLNH.shape  # head_dim is checked by config.validate_model
    check_seq_len(length, "flash")
    group = n_heads // k_BLKH.shape[2]
    axes = ("batch", "heads", "length", "head_dim")

    def heads_first(x_BLXH: jax.Array) -> jax.Array:
        x_BNLH = jnp.repeat(x_BLXH, group, axis=2).transpose(0, 2, 1, 3)
        return nn.with_logical_constraint(x_BNLH, axes)

    q_BNLH = nn.with_logical_constraint(q_BLNH.transpose(0, 2, 1, 3), axes)
    k_BNLH, v_BNLH = heads_first(k_BLKH), heads_first(v_BLKH)

    def per_shard(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
        return jax.lax.platform_dependent(
            q,
            k,
            v,
            seg,
            tpu=lambda q, k, v, seg: _flash(q, k, v, seg, block),
            default=lambda q, k, v, seg: _interpreted(q, k, v, seg, block),
        )

    spec = nn.logical_to_mesh_axes(("batch", "heads", None, None))
    out_BNLH = _per_device(per_shard, (spec, spec, spec, P(spec[0], None)), spec)(
        q_BNLH, k_BNLH, v_BNLH, segment_ids_BL.astype(jnp.int32)
    )
    out_BNLH = nn.with_logical_constraint(out_BNLH, axes)
    return out_BNLH.transpose(0, 2, 1, 3)


def _per_device(fn: Callable, in_specs: tuple[P, ...], out_spec: P) -> Callable:
    """XLA can't partition a Mosaic call, so under a mesh each device runs the kernel on
    its batch and head shard; the sequence is gathered (no ring over `length` here)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)


def _splash(
    q_BKGLH: jax.Array,
    k_BKLH: jax.Array,
    v_BKLH: jax.Array,
    seg_BL: jax.Array,
    window: int,
    interpret: bool,
    block: int | None,
) -> jax.Array:
    """Splash's multi-query kernel per (row, kv head): the G query heads of a group
    share one key/value head, so grouped-query attention needs no copies of keys."""
    length, group = q_BKGLH.shape[3], q_BKGLH.shape[2]
    shape = (length, length)
    # LocalMask (window - 1 back, 0 ahead) is causal too: a query sees `window` keys.
    mask = sm.LocalMask(shape, (window - 1, 0), 0) if window else sm.CausalMask(shape)
    block = _block(length, block)
    blocks = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # The kernel names its output and log-sum-exp "context", so a remat policy that
    # saves "context" (minimal_with_context) keeps them and the backward does not rerun
    # the forward kernel.
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([mask] * group),
        block_sizes=blocks,
        interpret=interpret,
        residual_checkpoint_name="context",
    )
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))

    def per_row(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
        return per_kv_head(q, k, v, sk.SegmentIds(seg, seg))

    return jax.vmap(per_row)(q_BKGLH, k_BKLH, v_BKLH, seg_BL)


def splash_attention(
    q_BLNH: jax.Array,
    k_BLKH: jax.Array,
    v_BLKH: jax.Array,
    segment_ids_BL: jax.Array,
    window: int = 0,
    block: int | None = None,
) -> jax.Array:
    """Causal, segment-masked, optionally sliding-window attention by the splash kernel,
    which skips the blocks its mask rules out (most of them with a short window); blocks
    of `block` rows as for `flash_attention`."""
    b, length, n_heads, head_dim = q_BLNH.shape
    check_seq_len(length, "splash")
    k_heads = k_BLKH.shape[2]
    q_BLNH = nn.with_logical_constraint(q_BLNH, ("batch", "length", "heads", "head_dim"))
    # Splash doesn't scale the scores; scaling q first is the same product.
    q_BKGLH = (q_BLNH * head_dim**-0.5).reshape(b, length, k_heads, n_heads // k_heads, head_dim)
    q_BKGLH = q_BKGLH.transpose(0, 2, 3, 1, 4)
    kv_axes = ("batch", "kv_heads", "length", "head_dim")
    k_BKLH = nn.with_logical_constraint(k_BLKH.transpose(0, 2, 1, 3), kv_axes)
    v_BKLH = nn.with_logical_constraint(v_BLKH.transpose(0, 2, 1, 3), kv_axes)

    def per_shard(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
        return jax.lax.platform_dependent(
            q,
            k,
            v,
            seg,
            tpu=functools.partial(_splash, window=window, interpret=False, block=block),
            default=functools.partial(_splash, window=window, interpret=True, block=block),
        )

    kv_spec = nn.logical_to_mesh_axes(("batch", "kv_heads", None, None))
    q_spec = P(kv_spec[0], kv_spec[1], None, None, None)
    out_BKGLH = _per_device(per_shard, (q_spec, kv_spec, kv_spec, P(kv_spec[0], None)), q_spec)(
        q_BKGLH, k_BKLH, v_BKLH, segment_ids_BL.astype(jnp.int32)
    )
    out_BLNH = out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(b, length, n_heads, head_dim)
    return nn.with_logical_constraint(out_BLNH, ("batch", "length", "heads", "head_dim"))
