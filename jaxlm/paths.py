"""Paths that may be local or on Cloud Storage (`gs://bucket/...`).

Run directories, data, tokenizers and metrics go through `etils.epath`, the path
type orbax and grain use, so a TPU pod can read its corpus and write its
checkpoints in a bucket (`pip install 'jaxlm[tpu]'` brings gcsfs). `pathlib.Path`
would fold `gs://b` into `gs:/b`. Object stores list directories with one request
per level and cannot append, so the few operations that differ live here.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """An epath for `path`; local paths are made absolute (orbax requires that)."""
    p = epath.Path(path)
    return p if is_remote(p) else p.absolute()


def is_remote(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def walk_files(directory: epath.Path) -> Iterator[epath.Path]:
    """Every file below `directory` (rglob is refused by epath on object stores)."""
    scheme = os.fspath(directory).split("://")[0] + "://" if is_remote(directory) else ""
    for root, _dirs, files in directory.walk():
        root = os.fspath(root)
        if scheme and not root.startswith(scheme):  # fsspec drops the scheme
            root = scheme + root.lstrip("/")
        for name in files:
            yield epath.Path(root) / name


def glob_files(pattern: str) -> list[epath.Path]:
    """Files matching a glob, sorted; on object stores the wildcards start after the
    last literal directory (`gs://b/data/*.jsonl`)."""
    if not is_remote(pattern):
        matches = glob.glob(pattern, recursive=True)
        return sorted(epath.Path(f) for f in matches if os.path.isfile(f))
    parts = pattern.split("/")
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if wild is None:
        p = epath.Path(pattern)
        return [p] if p.is_file() else []
    anchor = epath.Path("/".join(parts[:wild]))
    return sorted(p for p in anchor.glob("/".join(parts[wild:])) if p.is_file())
