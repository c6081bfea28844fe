"""Reading and writing Hugging Face weight files (`*.safetensors`, one file or shards
with a `model.safetensors.index.json`) with numpy, one tensor at a time.

Tensors are memory-mapped by `safetensors.safe_open` and read (or sliced) only when
asked for, so a reader never holds more than the tensor being converted; a writer
holds at most one shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlm.errors import JaxlmError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # what transformers used to cut shards at


class TensorReader:
    """The tensors of a Hugging Face directory by name, across shards.

    `rename` maps each stored name to the one the architecture's mapping uses (old
    checkpoints' `LayerNorm.gamma`, GPT-2 files saved without `transformer.`).
    """

    def __init__(self, directory: str | Path, rename: Callable[[str], str] = lambda n: n):
        directory = Path(directory)
        if (directory / INDEX_FILE).is_file():
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise JaxlmError(f"{directory}: no *.safetensors weights (torch .bin is not read)")
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}  # name -> (file, stored name)
        for file in files:
            path = directory / file
            if not path.is_file():
                raise JaxlmError(f"{path}: listed in {INDEX_FILE} but missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except SafetensorError as err:  # truncated or not a safetensors file at all
                raise JaxlmError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles[file] = handle
            for stored in handle.keys():  # noqa: SIM118 (a safe_open handle)
                self._where[rename(stored)] = (file, stored)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, part: int = 0, parts: int = 1) -> np.ndarray:
        """The tensor, or only part `part` of `parts` equal pieces along its last axis."""
        if parts == 1:
            file, stored = self._where[name]
            return self._handles[file].get_tensor(stored)
        tensor = self._slice(name)
        shape = tensor.get_shape()
        width = shape[-1] // parts
        index = (slice(None),) * (len(shape) - 1) + (slice(part * width, (part + 1) * width),)
        return tensor[index]

    def _slice(self, name: str):
        file, stored = self._where[name]
        return self._handles[file].get_slice(stored)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write `tensors` as `model.safetensors`, or as shards plus an index once they pass
    `max_shard_bytes`; returns the file names. Only the shard being filled is in memory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        old.unlink(missing_ok=True)
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f"shard-{len(written):05d}.tmp"
        save_file(current, str(path), metadata={"format": "pt"})
        written.append(path)
        current.clear()

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = array
        weight_map[name] = len(written)
        size += array.nbytes
        total += array.nbytes
    if current or not written:
        flush()
    if len(written) == 1:
        written[0].rename(directory / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for path, name in zip(written, names, strict=True):
        path.rename(directory / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: names[v] for k, v in sorted(weight_map.items())},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]
