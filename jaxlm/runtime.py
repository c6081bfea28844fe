"""The XLA settings jaxlm compiles its steps with: the one place for backend tuning.

On CPU, jax 0.10's XLA hands matmuls to YNNPACK by default; XLA's own Eigen GEMM
ran GPT-2's fp32 projection and LM-head shapes 16-23% faster on the 2-core AMD EPYC
(Zen 4) development machine, and the whole train step 1.05-1.17x faster
(benchmarks/README.md has the figures). Both are exact fp32 GEMMs,
so only summation order changes. The options go to `jax.jit(compiler_options=...)`,
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


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
    """The options for `platform` (default: JAX's default backend), or None for none."""
    if os.environ.get("JAXLM_XLA_DEFAULTS", "1") == "0":
        return None
    platform = platform or jax.default_backend()
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {
        k: v for k, v in COMPILER_OPTIONS.get(platform, {}).items() if f"--{k}" not in user_flags
    }
    return options or None
