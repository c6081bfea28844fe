"""How a Hugging Face tensor and a jaxlm parameter correspond, and the two loops that
use it: HF tensors -> params on the mesh (streamed), params -> HF tensors (one at a time).

A `Link` is declarative, so the HF shape a parameter needs is known before any tensor
is read: every name and shape is checked first and a mismatch is one error naming the
tensor. The layouts differ in three ways only: torch's `Linear` stores (out, in) where
our kernels are (in, out); attention kernels keep heads as their own axes (D, N, H)
where HF flattens them (N*H); GPT-2 fuses query, key and value into one `c_attn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxlm.errors import JaxlmError
from jaxlm.hf.safetensors_io import TensorReader


@dataclass(frozen=True)
class Link:
    """One HF tensor (or one of `parts` equal pieces of it along its last axis) <-> one
    jaxlm parameter.

    `hf` names the tensor, with `{i}` for the layer index in per-layer tensors; `jax` is
    the parameter's path, with `{layer}` for the block (`layers`, the scanned stack, or
    `layers_{i}`). The parameter, per layer, read as a matrix has the product of its
    first `split` axes as rows and the rest as columns; HF stores that matrix, or its
    transpose with `transpose` (torch `Linear`); `split` 0 is a flat vector.
    """

    hf: str
    jax: str
    transpose: bool = False
    split: int = 1
    part: int = 0
    parts: int = 1

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole HF tensor's shape for a per-layer parameter of `shape`."""
        if self.split == 0:
            return (math.prod(shape) * self.parts,)
        rows, cols = math.prod(shape[: self.split]), math.prod(shape[self.split :])
        matrix = (cols, rows) if self.transpose else (rows, cols)
        return (*matrix[:-1], matrix[-1] * self.parts)

    def to_jax(self, hf_part: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        matrix = hf_part.T if self.transpose and self.split else hf_part
        return matrix.reshape(shape)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        if self.split == 0:
            return param.reshape(-1)
        rows = math.prod(param.shape[: self.split])
        matrix = param.reshape(rows, -1)
        return matrix.T if self.transpose else matrix


def _paths(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _unflatten(like: Any, by_path: dict[str, Any]) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = [by_path["/".join(str(k.key) for k in path)] for path, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _placements(
    links: list[Link], n_layers: int, scanned: bool
) -> Iterator[tuple[Link, str, int | None]]:
    """(link, param path, layer index inside a scanned stack or None) for each use."""
    for link in links:
        if not link.per_layer:
            yield link, link.jax, None
        elif scanned:
            for i in range(n_layers):
                yield link, link.jax.format(layer="layers"), i
        else:
            for i in range(n_layers):
                yield link, link.jax.format(layer=f"layers_{i}"), None


def _layer_of(link: Link, index: int | None, path: str) -> int | None:
    if not link.per_layer:
        return None
    if index is not None:
        return index
    return int(path.split("layers_")[1].split("/")[0])


def check_tensors(
    reader: TensorReader,
    links: list[Link],
    abstract: Any,
    n_layers: int,
    scanned: bool,
    ignored: Callable[[str], bool],
) -> None:
    """Every HF tensor the params need exists with the right shape, and no tensor is
    left over (it would be an architecture variant we'd silently drop)."""
    params = _paths(abstract)
    names = reader.names()
    wanted: dict[str, tuple[int, ...]] = {}
    for link, path, index in _placements(links, n_layers, scanned):
        if path not in params:
            raise JaxlmError(f"internal: no parameter {path} for {link.hf}")
        shape = tuple(params[path].shape[1:] if index is not None else params[path].shape)
        layer = _layer_of(link, index, path)
        name = link.hf.format(i=layer) if layer is not None else link.hf
        expected = link.hf_shape(shape)
        if name not in names:
            raise JaxlmError(f"tensor {name} is missing from the checkpoint (for {path})")
        if reader.shape(name) != expected:
            raise JaxlmError(
                f"tensor {name} has shape {reader.shape(name)} in the checkpoint, but "
                f"{expected} is expected for the model's {path} {shape}"
            )
        wanted[name] = expected
    extra = sorted(n for n in names - set(wanted) if not ignored(n))
    if extra:
        raise JaxlmError(
            f"tensor {extra[0]} in the checkpoint has no place in the model "
            f"({len(extra)} such tensors); the architecture is not supported as saved"
        )


def _place(host: np.ndarray, target: Any) -> jax.Array:
    """A host array onto the target's sharding; each process places its own shards."""
    return jax.make_array_from_callback(host.shape, target.sharding, lambda index: host[index])


def load_params(
    reader: TensorReader,
    links: list[Link],
    abstract: Any,
    n_layers: int,
    scanned: bool,
    fresh: Any = None,
) -> Any:
    """The params tree of `abstract` (ShapeDtypeStructs with shardings) read from the
    HF tensors, one parameter at a time: a scanned stack is filled layer by layer on
    the host, placed on the mesh, and dropped before the next parameter is read.
    Parameters no link reads are `fresh`'s (a new task head)."""
    params = _paths(abstract)
    by_path: dict[str, list[tuple[Link, int | None]]] = {}
    for link, path, index in _placements(links, n_layers, scanned):
        by_path.setdefault(path, []).append((link, index))
    out: dict[str, jax.Array] = {}
    # disable=None: a bar on a terminal, nothing in logs
    for path, uses in tqdm(by_path.items(), "reading tensors", disable=None, leave=False):
        target = params[path]
        host = np.empty(target.shape, target.dtype)
        for link, index in uses:
            layer = _layer_of(link, index, path)
            name = link.hf.format(i=layer) if layer is not None else link.hf
            shape = host.shape[1:] if index is not None else host.shape
            value = link.to_jax(reader.read(name, link.part, link.parts), shape)
            if index is None:
                host[...] = value
            else:
                host[index] = value
        out[path] = _place(host, target)
        del host
    if fresh is not None:
        out = _paths(fresh) | out
    return _unflatten(abstract, out)


def _to_host(leaf: jax.Array) -> np.ndarray:
    if leaf.is_fully_addressable:
        return np.asarray(jax.device_get(leaf))
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def hf_tensors(
    links: list[Link], params: Any, n_layers: int, scanned: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs from `params`, one tensor at a time; the parameters one
    tensor kind needs (a whole scanned stack) are on the host only while it is written."""
    leaves = _paths(params)
    kinds: dict[str, list[Link]] = {}
    for link in links:
        kinds.setdefault(link.hf, []).append(link)
    for template, group in tqdm(kinds.items(), "writing tensors", disable=None, leave=False):
        group = sorted(group, key=lambda link: link.part)
        layers = range(n_layers) if group[0].per_layer else [None]
        cache: dict[str, np.ndarray] = {}
        for layer in layers:
            pieces = []
            for link in group:
                if layer is None:
                    path, index = link.jax, None
                elif scanned:
                    path, index = link.jax.format(layer="layers"), layer
                else:
                    path, index = link.jax.format(layer=f"layers_{layer}"), None
                if path not in cache:
                    cache[path] = _to_host(leaves[path])
                param = cache[path] if index is None else cache[path][index]
                pieces.append(link.to_hf(param))
            name = template.format(i=layer) if layer is not None else template
            yield name, pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)
        cache.clear()
