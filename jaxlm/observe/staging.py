"""Writers that only know local files (tensorboardX's event writer, jax.profiler's
trace) write into a local staging directory when the run directory is on an object
store (gs://), and the files are copied there with etils.epath."""

from __future__ import annotations

import os
import tempfile

from etils import epath

from jaxlm.paths import is_remote


def local_dir(target: epath.Path) -> str:
    """`target` itself when local (created), else a fresh local staging directory."""
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        return os.fspath(target)
    return tempfile.mkdtemp(prefix="jaxlm-stage-")


def upload(local: str, target: epath.Path) -> None:
    """Copy every file below `local` to the same relative path below a remote `target`
    (overwriting: event files grow, so each copy replaces the last)."""
    if not is_remote(target):
        return
    for root, _dirs, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            dest = target / os.path.relpath(source, local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(open(source, "rb").read())  # noqa: SIM115
