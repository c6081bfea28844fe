"""GFLOP/s of one matmul through each GEMM library XLA's CPU backend can use, beside
torch.matmul, in one process, alternating: fp32 for the training step's shapes, and
bf16 for whether jaxlm's bf16 compute path can reach the CPU's bf16 units.

XLA (jax 0.10) picks the library per compile with DebugOptions: YNNPACK fusions (its
default), none of them (Eigen, XLA's own GEMM), XNNPACK or oneDNN dot fusions.

    python benchmarks/matmul_libraries.py [--dtype float32|bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

LIBRARIES = {
    "ynnpack (XLA default)": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xnnpack": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
    "onednn": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
}
# (m, k, n): GPT-2 small's projections and LM head at 2 x 1024 tokens, and the square peak.
SHAPES = [(2048, 768, 3072), (2048, 3072, 768), (2048, 768, 50304), (2048, 2048, 2048)]


def measure(dtype: str, repeats: int, threads: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    rows = []
    for m, k, n in SHAPES:
        a = jnp.ones((m, k), dtype)
        b = jnp.ones((k, n), dtype)
        lowered = jax.jit(lambda x, y: x @ y).lower(a, b)
        fns = {name: lowered.compile(compiler_options=o or None) for name, o in LIBRARIES.items()}
        ta = torch.ones(m, k, dtype=getattr(torch, dtype))
        tb = torch.ones(k, n, dtype=getattr(torch, dtype))
        times = {name: [] for name in [*fns, "torch"]}
        for fn in fns.values():
            fn(a, b).block_until_ready()
        ta @ tb
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(a, b).block_until_ready()
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ta @ tb
            times["torch"].append(time.perf_counter() - t0)
        gflops = {name: 2 * m * k * n / statistics.median(t) / 1e9 for name, t in times.items()}
        rows.append({"shape": [m, k, n], "dtype": dtype, "gflops": gflops})
        print(
            f"{m}x{k}x{n} {dtype}: " + "  ".join(f"{k_} {v:.0f}" for k_, v in gflops.items()),
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.dtype, args.repeats, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
