"""TensorBoard event files for a run, in RUN_DIR/tensorboard/ (tensorboardX).

metrics.jsonl stays the record of a run; the events are the same scalars for
TensorBoard (`tensorboard --logdir RUN_DIR/tensorboard`), plus the resolved config and
the generated sample as text. A gs:// run directory is written locally and copied
(tensorboardX's own writer reaches object stores only through extra packages).
"""

from __future__ import annotations

import math
import time
from typing import Any

from etils import epath

from jaxlm.observe.staging import local_dir, upload
from jaxlm.paths import is_remote

TENSORBOARD_DIR = "tensorboard"


def scalar_tag(key: str) -> str:
    """`eval_loss` -> `eval/loss`, `loss` -> `train/loss`: TensorBoard groups by prefix."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardWriter:
    """Scalars of each metrics.jsonl record, the config and samples as text."""

    def __init__(self, run_dir: epath.Path, config_yaml: str, remote_every: float = 60.0) -> None:
        self.target = run_dir / TENSORBOARD_DIR
        self.local = local_dir(self.target)
        self.remote_every = remote_every
        self._last_upload = -math.inf
        # Imported here: tensorboardX imports torch whenever torch is installed, seconds
        # that a run with `train.tensorboard=false` should not pay.
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self.local, flush_secs=10)
        # Markdown: indented lines keep the YAML's layout.
        self.writer.add_text("config", _code(config_yaml), 0)

    def scalars(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(scalar_tag(key), float(value), step)
        if is_remote(self.target) and time.monotonic() - self._last_upload >= self.remote_every:
            self.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, _code(text), step)

    def flush(self) -> None:
        """Copy the events to a remote run directory: what tensorboardX's writer thread
        has written by now (it writes within `flush_secs`); `close` copies everything."""
        self.writer.flush()
        upload(self.local, self.target)
        self._last_upload = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        upload(self.local, self.target)


def _code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
