"""How a projection's product is computed: one `dot_general` in the axes' own order,
and, for decoding steps on CPU, against an output-major copy of the kernel.

Decoding multiplies a few rows by every weight once per token. XLA's CPU GEMMs read a
(K, N) weight at ~13 GB/s for (rows, K) x (K, N), but stream an (N, K) one once for all
rows of (N, K) x (rows, K)^T at 21-37 GB/s. So the model, applied once with the
OUTPUT_MAJOR collection mutable, leaves each big kernel transposed to (out axes, in
axes) there, and decoding steps, applied with that collection, read it
(`jaxlm.generation.programs.step_kernels`, `jaxlm.runtime.output_major_kernels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# Variable collection of projection kernels laid out output-major, (kept axes...,
# contracted axes...), made for decoding steps on CPU (see `output_major_projection`).
OUTPUT_MAJOR = "output_major"


def projection_axes(equation: str) -> tuple[str, str, list[str], list[str]] | None:
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
    axes = projection_axes(equation)
    if axes is None:
        return jnp.einsum(equation, x, kernel)
    lhs, rhs, contracted, _ = axes
    dims = (tuple(lhs.index(a) for a in contracted), tuple(rhs.index(a) for a in contracted))
    return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def _output_major(equation: str, kernel: jax.Array) -> jax.Array | None:
    """The kernel transposed to (kept axes..., contracted axes...), or None for an
    equation `projection` hands to einsum."""
    axes = projection_axes(equation)
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
    lhs, _, contracted, kept = projection_axes(equation)  # type: ignore[misc]
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


def _reads_output_major(module: nn.Module, name: str) -> bool:
    """Does `module` read its output-major `name` (applied with it, not making it)?"""
    return module.has_variable(OUTPUT_MAJOR, name) and not module.is_mutable_collection(
        OUTPUT_MAJOR
    )


def _makes_output_major(module: nn.Module, kernel: jax.Array) -> bool:
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
    if _reads_output_major(module, "tied_head"):
        dtype = embed.dtype or x.dtype
        return output_major_projection("bld,dv->blv", x.astype(dtype), table_VD.astype(dtype))
    if _makes_output_major(module, table_VD):
        module.put_variable(OUTPUT_MAJOR, "tied_head", jnp.zeros((), jnp.bool_))
    return embed.attend(x)


def module_projection(
    module: nn.Module, equation: str, x: jax.Array, kernel: jax.Array
) -> jax.Array:
    """`projection(equation, x, kernel)` for `module`'s own kernel: in decoding steps
    from the output-major copy, and with OUTPUT_MAJOR mutable making that copy."""
    if _reads_output_major(module, "kernel"):
        return output_major_projection(equation, x, module.get_variable(OUTPUT_MAJOR, "kernel"))
    kernel_om = _output_major(equation, kernel) if _makes_output_major(module, kernel) else None
    if kernel_om is not None:
        module.put_variable(OUTPUT_MAJOR, "kernel", kernel_om)
    return projection(equation, x, kernel)
