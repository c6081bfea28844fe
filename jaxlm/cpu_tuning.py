"""What jaxlm does differently on XLA's CPU backend, all of it here and nothing else.

Each trick applies only when JAX's default backend is the CPU, and stays only while it
gains at least 1.2x on the benchmark it targets; benchmarks/README.md ("CPU tuning")
has the figures of the ones kept and of the ones deleted. JAXLM_CPU_TUNING=0 turns
them all off (A/B runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax


def unroll_decoding() -> bool:
    """Should decoding run a scanned stack's layers unrolled (`unstack_layers`)? On CPU
    XLA's while loop over the layers is the slower form. Accelerators keep the scan,
    where unrolling would multiply a deep model's compile time."""
    return os.environ.get("JAXLM_CPU_TUNING", "1") != "0" and jax.default_backend() == "cpu"


def unstack_layers(params: Any) -> Any:
    """A scanned stack's params (a `layers` entry whose leaves lead with the layer axis)
    as the unrolled stack's `layers_{i}` entries, at any depth, so the same weights run
    through `scan_layers=False`."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        stacked = params["layers"]
        n_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(n_layers):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return out
