"""Throughput accounting (FLOPs per token, MFU) and the metrics.jsonl writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from jaxlm.config import ModelConfig

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


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward), N without
    the position table, plus 12 L d T for attention scores and values (PaLM, App. B)."""
    matmul_params = n_params - config.max_len * config.d_model
    return 6.0 * matmul_params + 12.0 * config.n_layers * config.d_model * seq_len


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
