"""Throughput accounting (peak FLOP/s for MFU), perplexity and the metrics.jsonl writer.
FLOPs per token are the family's, `jaxlm.model_config.flops_per_token`."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
from etils import epath

from jaxlm.paths import is_remote

# Dense peak per chip (TFLOP/s) in the precision a run of that chip would use.
# CPU: the whole host's fp32 matmul peak measured on the 2-core dev machines
# (shared/STACK-NOTES.md), split across its emulated devices.
PEAK_TFLOPS = {
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6": 918.0,
    "h200": 989.0,
    "h100": 989.0,
    "a100": 312.0,
}
CPU_HOST_TFLOPS = 0.3


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return CPU_HOST_TFLOPS * 1e12 / jax.local_device_count()


def perplexity(loss: float) -> float:
    """exp(loss), capped below float64's overflow (a diverged loss). The trainer's logs
    and `jaxlm eval` both use it, so their perplexities compare."""
    return math.exp(min(loss, 700.0))


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl`.

    Object stores (gs://) cannot append, so there the file is rewritten whole, at
    most every `remote_every` seconds and on `close`."""

    def __init__(self, path: str | os.PathLike, remote_every: float = 30.0) -> None:
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remote = is_remote(self.path)
        self.remote_every = remote_every
        self._lines: list[str] = []
        # -inf, not 0: monotonic time starts near 0 at boot, so on a machine up for
        # less than `remote_every` seconds a 0 would hold back the first flush.
        self._last_flush = -math.inf
        if self.remote and self.path.exists():  # a resumed run keeps its history
            self._lines = self.path.read_text().splitlines(keepends=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line)
            return
        self._lines.append(line)
        if time.monotonic() - self._last_flush >= self.remote_every:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            self.path.write_text("".join(self._lines))
            self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with epath.Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
