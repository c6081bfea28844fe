"""The XLA settings jaxlm compiles its steps with: the one place for backend tuning.

On CPU, jax 0.10's XLA hands matmuls to YNNPACK by default; XLA's own Eigen GEMM
ran GPT-2's fp32 projection and LM-head shapes 16-23% faster on the 2-core AMD EPYC
(Zen 4) development machine, and the whole train step 1.05-1.17x faster
(benchmarks/README.md has the figures). Both are exact fp32 GEMMs,
so only summation order changes. Eigen is the wrong choice for matmuls of a few rows,
though: decoding 2-8 rows at a time ran 1.4-2.8x faster through YNNPACK (Eigen's
one-row path, a matrix-vector product, stays the fastest for a single row), so
decoding programs pass their batch as `rows`. The options go to
`jax.jit(compiler_options=...)`,
so they apply to jaxlm's own steps whatever else the process compiles, and work when
the backend started before jaxlm was imported (XLA_FLAGS would not).

A flag the user sets in XLA_FLAGS wins over these; JAXLM_XLA_DEFAULTS=0 turns them off.
"""

from __future__ import annotations

import os
from typing import Any

import jax

# XLA DebugOptions fields by backend platform.
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {
        # "" = no YNNPACK fusions: dots go to Eigen, XLA's own multi-threaded GEMM.
        "xla_cpu_experimental_ynn_fusion_type": "",
    },
}
# For programs whose matmuls have 2..FEW_ROWS rows (decoding a small batch): XLA's own
# default, YNNPACK dots.
FEW_ROWS = 64
FEW_ROWS_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {}}


def compiler_options(platform: str | None = None, rows: int = 0) -> dict[str, Any] | None:
    """The options for `platform` (default: JAX's default backend), or None for none.
    `rows` > 1 is the row count of a program whose matmuls are all that small (a
    decoding step's batch); 0 is anything else (training, eval, prefill-heavy work)."""
    if os.environ.get("JAXLM_XLA_DEFAULTS", "1") == "0":
        return None
    platform = platform or jax.default_backend()
    user_flags = os.environ.get("XLA_FLAGS", "")
    table = FEW_ROWS_OPTIONS if 1 < rows <= FEW_ROWS else COMPILER_OPTIONS
    options = {k: v for k, v in table.get(platform, {}).items() if f"--{k}" not in user_flags}
    return options or None
