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

On Linux a jaxlm process also starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(`process_env`; the `jaxlm` command re-executes itself with it, since glibc reads it
only at start). XLA's CPU runtime allocates each step's temporaries afresh, and
glibc maps big blocks straight from the kernel, so every step page-faulted them in
again: 1.2 million faults and 4-5 s of kernel time per GPT-2 small step. Backed by
transparent huge pages, 50-180 thousand faults and 2-3 s; the step 1.0-1.14x faster
(benchmarks/README.md). Research code that imports jaxlm can set the variable itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

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
    if not _defaults_on():
        return None
    platform = _platform(platform)
    user_flags = os.environ.get("XLA_FLAGS", "")
    table = FEW_ROWS_OPTIONS if 1 < rows <= FEW_ROWS else COMPILER_OPTIONS
    options = {k: v for k, v in table.get(platform, {}).items() if f"--{k}" not in user_flags}
    return options or None


# About this machine's last-level cache: weights below it stay cached between steps.
CACHED_WEIGHT_BYTES = 64 * 2**20


def output_major_kernels(rows: int, weight_bytes: int, platform: str | None = None) -> bool:
    """Should a decoding program of `rows` rows over `weight_bytes` of weights give its
    steps output-major kernels (`jaxlm.models.projection.OUTPUT_MAJOR`)? On CPU: XLA's
    GEMMs stream an (N, K) weight once for all rows of (N, K) x (rows, K)^T but read a
    (K, N) one at about 13 GB/s, so 2..FEW_ROWS rows gain (GPT-2 small, 8 rows:
    1.26-1.48x; tiny: 1.09-1.13x). One row gains only when the weights come from
    memory (GPT-2 small 1.07-1.15x; tiny, in cache, 0.9-0.98x). Measured in
    benchmarks/README.md."""
    if not _defaults_on() or rows > FEW_ROWS:
        return False
    return _platform(platform) == "cpu" and (rows > 1 or weight_bytes > CACHED_WEIGHT_BYTES)


def unrolled_decoding(platform: str | None = None) -> bool:
    """Should decoding run a scanned stack's layers unrolled (`jaxlm.generation`)? On
    CPU: GPT-2 small decoding 8 rows took 8.1-8.7 s a call through the scan and 4.0-4.3
    s unrolled. Accelerators keep the scan, not measured here, where unrolling would
    multiply the compile time of a deep model's decoding by its layers."""
    return _defaults_on() and _platform(platform) == "cpu"


def _defaults_on() -> bool:
    return os.environ.get("JAXLM_XLA_DEFAULTS", "1") != "0"


def _platform(platform: str | None) -> str:
    """`platform`, or JAX's default backend when None."""
    if platform is None:
        import jax  # here, so the CLI can re-execute itself before JAX loads

        platform = jax.default_backend()
    return platform


MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"  # THP for glibc's big blocks ("madvise" mode)


def process_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables a jaxlm process should start with that `environ` (default:
    this process's) lacks: {} when there are none, off Linux, or with
    JAXLM_XLA_DEFAULTS=0. A GLIBC_TUNABLES the user set keeps their entries."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or environ.get("JAXLM_XLA_DEFAULTS", "1") == "0":
        return {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return {}
    return {"GLIBC_TUNABLES": ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)}


def reexec_with_process_env() -> None:
    """Replace this process by itself, same arguments and pid, when `process_env` says
    its environment lacks something; returns only when it does not."""
    env = process_env()
    if env:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
