"""Where jaxlm's train step spends its GEMM time: every dot of the compiled step, timed
alone with its exact shapes and dimension numbers, grouped and summed.

A `jax.profiler` trace cannot say this on CPU (Eigen dots complete asynchronously in
the thread pool, so their trace events are only the launches). Instead this compiles
the tiny step as `train_speed.py` does, reads every `dot` of the optimised HLO (the
shapes and contracting dimensions XLA's layout assignment chose), and times each
distinct one in isolation through the same compiler options. Only the entry
computation's dots are read, so layers are unrolled unless `--set` says otherwise
(a scanned stack's dots sit in the loop body).

    python benchmarks/dot_profile.py [--config tiny] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIGS, shape_overrides, train_setup

DOT = re.compile(
    r"%(dot[\w.]*) = \w+\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\), (.*?)metadata"
)
DEF = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")


def step_hlo(name: str, settings: list[str]) -> str:
    """The optimised HLO text of the jaxlm train step for config `name`."""
    import jax
    import numpy as np
    from flax import linen as nn

    c = CONFIGS[name]
    setup = train_setup([*shape_overrides(c), *settings], 100)
    shape = (c["batch"], c["seq_len"])
    batch = {
        "inputs": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
    }
    jitted = jax.jit(setup.raw_step)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return jitted.lower(setup.state, batch).compile().as_text()


def dots(hlo: str) -> collections.Counter:
    """(lhs shape, rhs shape, dimension numbers) -> how many dots of the entry have it."""
    shapes = {m[1]: tuple(int(x) for x in m[3].split(",") if x) for m in DEF.finditer(hlo)}
    entry = hlo[hlo.index("\nENTRY") :]
    found = collections.Counter()
    for m in DOT.finditer(entry):
        attrs = m[4]

        def dims(key: str, attrs: str = attrs) -> tuple[int, ...]:
            hit = re.search(key + r"=\{([\d,]*)\}", attrs)
            return tuple(int(x) for x in hit[1].split(",") if x) if hit else ()

        numbers = (
            (dims("lhs_contracting_dims"), dims("rhs_contracting_dims")),
            (dims("lhs_batch_dims"), dims("rhs_batch_dims")),
        )
        found[(shapes[m[2]], shapes[m[3]], numbers)] += 1
    return found


def time_dot(lhs: tuple, rhs: tuple, numbers: tuple, repeats: int = 7) -> tuple[float, float]:
    """(median seconds, FLOPs) of one dot alone."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    a = jax.numpy.asarray(rng.standard_normal(lhs, np.float32))
    b = jax.numpy.asarray(rng.standard_normal(rhs, np.float32))
    fn = jax.jit(lambda x, y: jax.lax.dot_general(x, y, numbers))
    out = fn(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    contracted = np.prod([lhs[i] for i in numbers[0][0]])
    return statistics.median(times), 2.0 * out.size * contracted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--set", action="append", help="a jaxlm config override")
    args = parser.parse_args()
    found = dots(step_hlo(args.config, args.set or ["model.scan_layers=false"]))
    rows, total_s, total_flops = [], 0.0, 0.0
    for (lhs, rhs, numbers), count in found.items():
        seconds, flops = time_dot(lhs, rhs, numbers)
        total_s += seconds * count
        total_flops += flops * count
        rows.append((seconds * count, count, lhs, rhs, numbers, flops / seconds / 1e9))
    print(f"{sum(found.values())} dots in the {args.config} step")
    for ms, count, lhs, rhs, numbers, gflops in sorted(rows, reverse=True):
        print(
            f"{ms * 1e3:7.1f} ms {count:3d}x {lhs} x {rhs} contract {numbers[0]} "
            f"batch {numbers[1]}: {gflops:5.0f} GFLOP/s"
        )
    print(
        f"all dots alone: {total_s * 1e3:.0f} ms, {total_flops / 1e9:.1f} GFLOP, "
        f"{total_flops / total_s / 1e9:.0f} GFLOP/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
