"""The device mesh and the table that maps logical axis names onto it.

Models name their axes ("batch", "embed", "heads", ...); which mesh axis each lands
on is configuration (`mesh.rules`), so a parallelism strategy is a rules table, not
model code. Every shape is checked against its sharding here, before compiling, so
an impossible layout fails with the parameter's name instead of an XLA error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MESH_AXES, MeshConfig
from jaxlm.errors import JaxlmError

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def mesh_shape(config: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 and check that the axes multiply to the device count."""
    sizes = {axis: getattr(config, axis) for axis in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if n_devices % fixed:
                raise JaxlmError(
                    f"mesh: {n_devices} devices cannot be split with "
                    + ", ".join(f"{a}={s}" for a, s in sizes.items() if s != -1)
                )
            sizes[axis] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise JaxlmError(
            f"mesh: {shape} needs {math.prod(sizes.values())} devices, have {n_devices}"
        )
    return sizes


def check_axes_used(config: MeshConfig, sizes: dict[str, int]) -> None:
    """Refuse a mesh axis with devices that no rule uses: they would only repeat work."""
    used = {axis for axes in config.resolved_rules().values() for axis in axes}
    for axis, size in sizes.items():
        if size > 1 and axis not in used:
            raise JaxlmError(
                f"config key 'mesh.{axis}': {size} devices, but no rule of strategy "
                f"{config.strategy!r} (with mesh.rules) shards anything over {axis!r}"
            )


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over `devices` (default: all, in JAX's topology-aware order)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    check_axes_used(config, sizes)
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(shape)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        try:  # places neighbouring mesh coordinates on neighbouring chips
            return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
        except (ValueError, NotImplementedError):  # a shape the TPU torus can't hold whole
            return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)
    # Multislice: only `data` crosses the slow links between slices (DCN).
    if sizes["data"] % slices:
        raise JaxlmError(
            f"config key 'mesh.data': {sizes['data']} is not a multiple of the {slices} "
            "slices; data parallelism is what spans slices"
        )
    dcn = (slices,) + (1,) * (len(shape) - 1)
    ici = (sizes["data"] // slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=types)


def logical_rules(config: MeshConfig) -> Rules:
    """The config's rules as flax expects them: (logical, mesh axes or None)."""
    rules = []
    for name, axes in config.resolved_rules().items():
        rules.append((name, tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)))
    return tuple(rules)


def logical_shardings(abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree that still carries flax's logical-axis boxes."""
    specs = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return "/".join(parts)


def check_divisible(abstract: Any, shardings: Any, what: str = "parameter") -> None:
    """Refuse any array whose dimension is not a multiple of its mesh axes' size."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract))
    for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True):
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
            parts = _axes_size(sharding.mesh, axes)
            if size % parts:
                raise JaxlmError(
                    f"mesh: {what} {_path_name(path)} dimension {dim} "
                    f"(size {size}) cannot be split over mesh axes {axes} ({parts} devices)"
                )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of (batch, length) token arrays."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def check_batch(
    batch_size: int, sharding: NamedSharding, seq_len: int | None = None, grad_accum: int = 1
) -> None:
    """Refuse a global batch (or row length) that its mesh axes don't divide, or whose
    microbatches (train.grad_accum) they don't."""
    dims = [("train.batch_size", batch_size)]
    if seq_len is not None:
        dims.append(("train.seq_len", seq_len))
    for (key, size), axes in zip(dims, sharding.spec, strict=False):
        parts = _axes_size(sharding.mesh, axes)
        if size % parts:
            raise JaxlmError(
                f"config key '{key}': {size} cannot be split over {parts} "
                f"devices of mesh axes {axes}"
            )
    axes = sharding.spec[0] if len(sharding.spec) else None
    parts = _axes_size(sharding.mesh, axes)
    if grad_accum > 1 and (batch_size // grad_accum) % parts:
        raise JaxlmError(
            f"config key 'train.grad_accum': {grad_accum} microbatches of "
            f"{batch_size // grad_accum} rows (train.batch_size {batch_size}) cannot each be "
            f"split over the {parts} devices of mesh axes {axes}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
