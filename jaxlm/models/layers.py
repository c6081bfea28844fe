"""Small building blocks shared by the model families, all logically annotated."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]
INIT_STD = 0.02  # GPT-2's


def logical(init: Initializer, axes: tuple[str, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


def dense_init(axes: tuple[str, ...], scale: float = 1.0) -> Initializer:
    return logical(nn.initializers.normal(INIT_STD * scale), axes)


def layer_norm(
    eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str, use_bias: bool = True
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=use_bias,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def rms_norm(eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str) -> nn.RMSNorm:
    """Llama's norm: no centring and no bias; statistics in fp32 whatever the dtype."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        name=name,
    )


def make_norm(
    kind: str, eps: float, use_bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str
) -> nn.Module:
    """`kind` is ModelConfig.norm: layernorm or rmsnorm."""
    if kind == "rmsnorm":
        return rms_norm(eps, dtype, param_dtype, name)
    return layer_norm(eps, dtype, param_dtype, name, use_bias)


# Variable collection of projection kernels laid out output-major, (kept axes...,
# contracted axes...), made for decoding steps on CPU (see `output_major_projection`).
OUTPUT_MAJOR = "output_major"


def _projection_axes(equation: str) -> tuple[str, str, list[str], list[str]] | None:
    """(lhs, rhs, contracted, kernel's kept axes) of a projection equation, or None when
    its output is not x's kept axes then the kernel's (`projection` then uses einsum)."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    contracted = [a for a in lhs if a in rhs]
    kept = [a for a in lhs if a not in rhs] + [a for a in rhs if a not in lhs]
    if "".join(kept) != out or any(a in out for a in contracted):
        return None
    return lhs, rhs, contracted, [a for a in rhs if a not in lhs]


def projection(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, kernel)` for a projection (no batch axes, output = x's
    kept axes then the kernel's), as one `dot_general` that contracts the axes in the
    order they appear. jnp.einsum lists multi-axis contractions in reverse ("blnh,nhd"
    contracts (h, n)), and XLA then transposes the kernel and the activations into that
    order on every call: a copy of the attention output kernel per step, inside the
    decode loop too (benchmarks/README.md)."""
    axes = _projection_axes(equation)
    if axes is None:
        return jnp.einsum(equation, x, kernel)
    lhs, rhs, contracted, _ = axes
    dims = (tuple(lhs.index(a) for a in contracted), tuple(rhs.index(a) for a in contracted))
    return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def output_major(equation: str, kernel: jax.Array) -> jax.Array | None:
    """The kernel transposed to (kept axes..., contracted axes...), or None for an
    equation `projection` hands to einsum."""
    axes = _projection_axes(equation)
    if axes is None:
        return None
    _, rhs, contracted, kept = axes
    return jnp.transpose(kernel, [rhs.index(a) for a in kept + contracted])


def output_major_projection(equation: str, x: jax.Array, kernel_om: jax.Array) -> jax.Array:
    """`projection(equation, x, kernel)` from the output-major kernel, for a few rows of
    x (a decoding step). XLA's CPU GEMMs stream the weights of (N, K) x (few, K)^T ->
    (N, few) once for all rows, and (few, K) x (K, N) at 13 GB/s: an 8-row GPT-2 small
    step's dots take 22 instead of 34 ms (benchmarks/README.md). The optimization
    barrier stops XLA from folding the result's transpose back into the slow order."""
    lhs, _, contracted, kept = _projection_axes(equation)  # type: ignore[misc]
    n_kept = len(kept)
    dims = (
        tuple(range(n_kept, n_kept + len(contracted))),
        tuple(lhs.index(a) for a in contracted),
    )
    y = jax.lax.optimization_barrier(jax.lax.dot_general(kernel_om, x, (dims, ((), ()))))
    return jnp.moveaxis(y, tuple(range(n_kept)), tuple(range(y.ndim - n_kept, y.ndim)))


# Smallest kernel worth an output-major copy: below it the weights stay in cache, and
# the extra transposes cost more than the order saves (tiny config: 0.7-0.9x).
OUTPUT_MAJOR_MIN_BYTES = 2 * 2**20


def reads_output_major(module: nn.Module, name: str) -> bool:
    """Does `module` read its output-major `name` (applied with it, not making it)?"""
    return module.has_variable(OUTPUT_MAJOR, name) and not module.is_mutable_collection(
        OUTPUT_MAJOR
    )


def makes_output_major(module: nn.Module, kernel: jax.Array) -> bool:
    """Should `module` put an output-major copy of `kernel` (applied with OUTPUT_MAJOR
    mutable, not initialising, and the kernel big enough)?"""
    return (
        module.is_mutable_collection(OUTPUT_MAJOR)
        and not module.is_initializing()
        and kernel.size * kernel.dtype.itemsize >= OUTPUT_MAJOR_MIN_BYTES
    )


def tied_logits(module: nn.Module, embed: nn.Embed, x: jax.Array) -> jax.Array:
    """`embed.attend(x)`, the logits of a head tied to the embedding table. The table
    (V, D) is output-major already, so `module` keeps only a marker that its decoding
    steps should read it in that order."""
    table_VD = embed.embedding
    if reads_output_major(module, "tied_head"):
        dtype = embed.dtype or x.dtype
        return output_major_projection("bld,dv->blv", x.astype(dtype), table_VD.astype(dtype))
    if makes_output_major(module, table_VD):
        module.put_variable(OUTPUT_MAJOR, "tied_head", jnp.zeros((), jnp.bool_))
    return embed.attend(x)


class EinsumDense(nn.Module):
    """A projection `einsum(equation, x, kernel) + bias` with named kernel axes.

    Flax's DenseGeneral initialises a flattened kernel, which can't carry per-axis
    logical names; this keeps the kernel in its true shape.
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] = ()
    init_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            dense_init(self.kernel_axes, self.init_scale),
            self.kernel_shape,
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if reads_output_major(self, "kernel"):
            y = output_major_projection(self.equation, x, self.get_variable(OUTPUT_MAJOR, "kernel"))
        else:
            om = output_major(self.equation, kernel) if makes_output_major(self, kernel) else None
            if om is not None:
                self.put_variable(OUTPUT_MAJOR, "kernel", om)
            y = projection(self.equation, x, kernel)
        if self.bias_axes:
            n = len(self.bias_axes)
            bias_init = logical(nn.initializers.zeros, self.bias_axes)
            bias = self.param("bias", bias_init, self.kernel_shape[-n:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class GeluMlp(nn.Module):
    """GPT-2's feed-forward: fc_in -> GELU -> fc_out."""

    ff_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = EinsumDense(
            "bld,df->blf",
            (d_model, self.ff_dim),
            ("embed", "mlp"),
            ("mlp",) if self.use_bias else (),
            name="fc_in",
            **kw,
        )(x_BLD)
        h = nn.with_logical_constraint(self.activate(h), ("batch", "length", "mlp"))
        out = EinsumDense(
            "blf,fd->bld",
            (self.ff_dim, d_model),
            ("mlp", "embed"),
            ("embed",) if self.use_bias else (),
            self.out_init_scale,
            name="fc_out",
            **kw,
        )(h)
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.gelu(h)


class ReluMlp(GeluMlp):
    """T5's feed-forward: GPT-2's two matrices with ReLU in between (and, in T5, no biases)."""

    def activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.relu(h)


class SwiGluMlp(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), a gated unit with three matrices."""

    ff_dim: int
    out_init_scale: float
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True
    use_bias: bool = False

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bias_in = ("mlp",) if self.use_bias else ()

        def project_in(name: str) -> jax.Array:
            h = EinsumDense(
                "bld,df->blf", (d_model, self.ff_dim), ("embed", "mlp"), bias_in, name=name, **kw
            )(x_BLD)
            return nn.with_logical_constraint(h, ("batch", "length", "mlp"))

        h = jax.nn.silu(project_in("gate")) * project_in("up")
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        out = EinsumDense(
            "blf,fd->bld",
            (self.ff_dim, d_model),
            ("mlp", "embed"),
            ("embed",) if self.use_bias else (),
            self.out_init_scale,
            name="down",
            **kw,
        )(h)
        return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)


MLPS = {"gelu": GeluMlp, "swiglu": SwiGluMlp, "relu": ReluMlp}
