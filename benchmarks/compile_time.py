"""Compile time of the train step, 24 scanned layers beside 2 (same width).

`nn.scan` compiles one layer body whatever the depth, so a deep stack should compile
in about the time of a shallow one (the issue's bar: 24 layers within 1.5x of 2).
Each measurement is a fresh subprocess, so no trace or compile cache is shared; the
step is the real one (forward, backward, AdamW update), lowered from abstract state
with `jax.jit(...).lower(...)` and timed separately for `.compile()`.

    python benchmarks/compile_time.py [--layers 2 24] [--repeats 3] [--unrolled] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import shape_overrides

REPO = Path(__file__).resolve().parents[1]
WIDTH = dict(d_model=256, n_heads=4, vocab=8192, seq_len=256, batch=8)


def worker(n_layers: int, scan: bool, attention: str) -> dict:
    """One measurement, in this (fresh) process, on one device."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxlm import sharding as shd
    from jaxlm.config import load_config
    from jaxlm.models import build_model
    from jaxlm.train.optim import make_optimizer, make_schedule
    from jaxlm.train.state import state_shardings
    from jaxlm.train.step import make_train_step

    c = WIDTH
    config = load_config(
        None,
        [
            *shape_overrides(c, n_layers),
            f"model.scan_layers={str(scan).lower()}",
            f"model.attention={attention}",
        ],
    )
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    rules = shd.logical_rules(config.mesh)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, 100)
    abstract, shardings = state_shardings(model, tx, c["seq_len"], mesh, rules)
    data = shd.batch_sharding(mesh, rules)
    shape = (c["batch"], c["seq_len"])
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    step = jax.jit(
        make_train_step(model, tx, make_schedule(config.optim, 100)),
        in_shardings=(shardings, {k: data for k in batch}),
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return {"layers": n_layers, "scan": scan, "lower_s": t1 - t0, "compile_s": t2 - t1}


def measure(n_layers: int, scan: bool, attention: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n_layers), "--attention", attention]
    cmd += ["--unrolled"] if not scan else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 24], metavar=("FEW", "MANY"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unrolled", action="store_true", help="also (or, with --worker, only)")
    parser.add_argument("--attention", default="einsum")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, not args.unrolled, args.attention)))
        return 0

    few, many = args.layers
    kinds = [True, False] if args.unrolled else [True]
    rows = {}
    for scan in kinds:
        for _ in range(args.repeats):  # alternate, so machine noise hits both depths
            for n in (few, many):
                rows.setdefault((scan, n), []).append(measure(n, scan, args.attention))
    print(f"train step, d_model={WIDTH['d_model']}, seq {WIDTH['seq_len']}, batch "
          f"{WIDTH['batch']}, vocab {WIDTH['vocab']}, attention={args.attention}, "
          f"median of {args.repeats} fresh processes")  # fmt: skip
    print(f"{'stack':>10} {'layers':>6} {'lower s':>8} {'compile s':>9} {'lower+compile':>13}")
    report = []
    for scan in kinds:
        medians = {}
        for n in (few, many):
            lower = statistics.median(r["lower_s"] for r in rows[(scan, n)])
            comp = statistics.median(r["compile_s"] for r in rows[(scan, n)])
            medians[n] = (lower, comp)
            name = "scanned" if scan else "unrolled"
            print(f"{name:>10} {n:>6} {lower:>8.2f} {comp:>9.2f} {lower + comp:>13.2f}")
            report.append({"scan": scan, "layers": n, "lower_s": lower, "compile_s": comp})
        ratio = medians[many][1] / medians[few][1]
        total = sum(medians[many]) / sum(medians[few])
        print(f"{'':>10} {many}/{few}: compile x{ratio:.2f}, lower+compile x{total:.2f}")
        report.append({"scan": scan, "compile_ratio": ratio, "total_ratio": total})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
