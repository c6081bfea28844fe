"""Checksums of checkpoint files, so a truncated or altered checkpoint is caught.

orbax commits a step atomically: on local disks it renames a temporary directory,
on object stores (no rename there) it writes `commit_success.txt` into the step
directory last. A crash mid-write therefore leaves an uncommitted step that orbax
never lists; but nothing in orbax notices a file damaged *after* the write (a full
disk, a bad copy, bit rot), and tensorstore may read such bytes without complaint.
So each step gets a manifest of every file's size and SHA-256, written inside the
step before orbax commits it: a committed step without a manifest is damaged too.
"""

from __future__ import annotations

import hashlib
import json

import orbax.checkpoint as ocp
from etils import epath

from jaxlm.errors import JaxlmError
from jaxlm.paths import walk_files

MANIFEST = "jaxlm_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"
# Files orbax writes or rewrites while committing, after the manifest is written.
_COMMITTED_LATER = frozenset({MANIFEST, COMMIT_FILE, "_CHECKPOINT_METADATA"})


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
    files = walk_files(step_dir)
    return sorted(p for p in files if str(p.relative_to(step_dir)) not in _COMMITTED_LATER)


def write_manifest(step_dir: epath.Path) -> None:
    entries = {
        str(p.relative_to(step_dir)): [p.stat().length, _sha256(p)] for p in _files(step_dir)
    }
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
    tmp.replace(step_dir / MANIFEST)


def verify(step_dir: epath.Path, step: int) -> None:
    """Raise CorruptCheckpoint naming the first file that is missing, resized or altered."""
    if not (step_dir / MANIFEST).is_file():
        raise CorruptCheckpoint(step, step_dir / MANIFEST, "missing, so no file can be checked")
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


def uncommitted_dir(directory: epath.Path, step: int) -> epath.Path:
    """Where orbax writes `step` before committing it: a temporary directory, or on
    object stores the step directory itself."""
    tmp = directory / f"{step}{TMP_MARKER}"
    return tmp if tmp.is_dir() else directory / str(step)


def incomplete_steps(directory: epath.Path) -> list[epath.Path]:
    """Step directories a crashed save left behind, by orbax's own rule for the
    storage (temporary name locally, no commit file on object stores); orbax never
    lists them as steps."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if ocp.utils.is_tmp_checkpoint(p))
