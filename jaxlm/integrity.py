"""Checksums of checkpoint files, so a truncated or altered checkpoint is caught.

orbax makes a step directory appear atomically, so a crash mid-write leaves only a
temporary directory; but nothing in it notices a file damaged *after* the write
(a full disk, a bad copy, bit rot), and tensorstore may read such bytes without
complaint. Each finished step gets a manifest of every file's size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json

from etils import epath

from jaxlm.errors import JaxlmError
from jaxlm.paths import walk_files

MANIFEST = "jaxlm_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"


class CorruptCheckpoint(JaxlmError):
    """A checkpoint file does not match its manifest."""

    def __init__(self, step: int, path: epath.Path, problem: str) -> None:
        self.step = step
        super().__init__(f"checkpoint step {step} is corrupt: {path}: {problem}")


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: epath.Path) -> list[epath.Path]:
    return sorted(p for p in walk_files(step_dir) if p.name != MANIFEST)


def write_manifest(step_dir: epath.Path) -> None:
    entries = {
        str(p.relative_to(step_dir)): [p.stat().length, _sha256(p)] for p in _files(step_dir)
    }
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
    tmp.replace(step_dir / MANIFEST)


def has_manifest(step_dir: epath.Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def verify(step_dir: epath.Path, step: int) -> None:
    """Raise CorruptCheckpoint naming the first file that is missing, resized or altered."""
    try:
        entries = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CorruptCheckpoint(step, step_dir / MANIFEST, "manifest unreadable") from None
    for name, (size, digest) in entries.items():
        path = step_dir / name
        if not path.is_file():
            raise CorruptCheckpoint(step, path, "missing")
        actual = path.stat().length
        if actual != size:
            raise CorruptCheckpoint(step, path, f"truncated or resized ({actual} of {size} bytes)")
        if _sha256(path) != digest:
            raise CorruptCheckpoint(step, path, "contents altered (SHA-256 mismatch)")


def incomplete_steps(directory: epath.Path) -> list[epath.Path]:
    """Step directories a crashed save left behind; orbax never lists them as steps."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name)
