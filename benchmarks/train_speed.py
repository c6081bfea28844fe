"""Training speed of jaxlm beside the PyTorch reference, alternating, in one run.

Both sides train the same GPT-2 (same sizes, vocab, batch, sequence, fp32, AdamW with
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, clipping to norm 1.0,
constant lr 3e-4) on random tokens; each run is a fresh subprocess, and the runs
alternate jaxlm, reference, jaxlm, reference... so machine noise hits both. Every step
ends on a host read of the loss on both sides (the reference's `loss.item()`).

    python benchmarks/train_speed.py --config tiny [--repeats 3] [--compile] [--json out.json]

FLOPs per token are the reference's formula (common.FLOPS_FORMULA). MFU is against the
fp32 matmul peak measured in the same run: each process measures its own library's
2048^3 matmul before and after its steps, and the run's peak is the highest of them.
Compile time is the first (warm-up) step's time less the median step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    CONFIGS,
    FLOPS_FORMULA,
    REFERENCE,
    flops_per_token,
    peak_rss_mb,
    python,
    run_json,
    shape_overrides,
    summary,
    train_setup,
    xla_matmul_peak_gflops,
)

# jaxlm's settings for this run beyond the shared shape; everything else is jaxlm's
# default (see benchmarks/README.md for what each one is worth). Unrolled layers: at
# 4-12 layers compiling them costs seconds, and the step skips the scan's stacked
# activation buffers (1.08-1.11x on tiny).
JAXLM_SETTINGS: list[str] = ["model.scan_layers=false"]


def jax_worker(c: dict, steps: int, warmup: int, settings: list[str], peak_n: int) -> dict:
    """One jaxlm measurement, in this (fresh) process, on one device."""
    import jax
    import numpy as np

    from jaxlm import sharding as shd

    total = steps + warmup
    setup = train_setup(
        [
            *shape_overrides(c),
            "optim.lr=3e-4",
            "optim.b1=0.9",
            "optim.b2=0.95",
            "optim.eps=1e-8",
            "optim.weight_decay=0.1",
            "optim.grad_clip=1.0",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            *settings,
        ],
        total,
    )
    state, step_fn = setup.state, setup.step_fn
    rng = np.random.default_rng(1)
    shape = (c["batch"], c["seq_len"])
    data = shd.batch_sharding(setup.mesh, setup.rules)

    def batch():
        tokens = rng.integers(0, c["vocab"], (shape[0], shape[1] + 1)).astype(np.int32)
        host = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
        }
        return {k: jax.device_put(v, data) for k, v in host.items()}

    quick = dict(samples=2, min_sample_s=0.02) if peak_n < 1024 else {}  # --smoke's
    peak_before = xla_matmul_peak_gflops(peak_n, **quick)
    losses, warm_times, times = [], [], []
    for i in range(warmup + steps):
        b = batch()
        t = time.perf_counter()
        state, metrics = step_fn(state, b)
        losses.append(float(metrics["loss"]))
        (warm_times if i < warmup else times).append(time.perf_counter() - t)
    peak_after = xla_matmul_peak_gflops(peak_n, **quick)
    return measurement(c, times, warm_times, losses, max(peak_before, peak_after))


def measurement(c, times, warm_times, losses, peak) -> dict:
    tokens = c["batch"] * c["seq_len"]
    st = summary(times)
    tps = tokens / st["median"]
    return {
        "tokens_per_sec": tps,
        "tokens_per_sec_min": tokens / st["max"],
        "tokens_per_sec_max": tokens / st["min"],
        "step_time_ms": st["median"] * 1e3,
        "warmup_step_times_ms": [t * 1e3 for t in warm_times],
        "peak_gflops_used": peak,
        "mfu_vs_measured_peak": flops_per_token(c) * tps / (peak * 1e9),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_rss_mb": peak_rss_mb(),
    }


def compile_seconds(result: dict) -> float:
    """First warm-up step less a steady step: tracing and compiling (torch.compile's too)."""
    return max(result["warmup_step_times_ms"][0] - result["step_time_ms"], 0.0) / 1e3


def commands(
    name: str, steps: int, warmup: int, threads: int, settings: list[str], peak_n: int = 2048
) -> tuple[list[str], dict[str, list[str]]]:
    """The jaxlm worker's command line, and the reference's per mode (eager, compiled)."""
    c = CONFIGS[name]
    jax_cmd = [python(), __file__, "--worker", "--config", name]
    jax_cmd += ["--steps", str(steps), "--warmup-steps", str(warmup)]
    jax_cmd += [f"--set={s}" for s in settings] + ["--peak-n", str(peak_n)]
    ref_cmd = [python(), str(REFERENCE), "--threads", str(threads), "--peak-n", str(peak_n)]
    ref_cmd += ["--steps", str(steps), "--warmup-steps", str(warmup)]
    for key in ("d_model", "n_layers", "n_heads", "seq_len", "batch", "vocab"):
        ref_cmd += [f"--{key.replace('_', '-')}", str(c[key])]
    ref_cmd += ["--lr", "3e-4", "--weight-decay", "0.1", "--grad-clip", "1.0"]
    return jax_cmd, {"eager": ref_cmd, "compiled": [*ref_cmd, "--compile"]}


def compare(
    name: str,
    repeats: int = 2,
    steps: int = 10,
    warmup: int = 2,
    threads: int = 2,
    modes: tuple[str, ...] = ("eager",),
    settings: list[str] | None = None,
    peak_n: int = 2048,
    log=print,
) -> dict:
    """`repeats` rounds of jaxlm, then the reference in each of `modes` (eager, compiled),
    each a fresh process; ratios are taken within a round (jaxlm / that round's
    reference), and summarised over rounds. `modes` () runs jaxlm alone."""
    settings = JAXLM_SETTINGS if settings is None else settings
    jax_cmd, ref_cmds = commands(name, steps, warmup, threads, settings, peak_n)
    rounds = []
    for i in range(repeats):
        jx = run_json(jax_cmd)
        jx["compile_s"] = compile_seconds(jx)
        rnd = {"jaxlm": jx}
        line = f"  {name} round {i + 1}: jaxlm {jx['tokens_per_sec']:7.0f} tok/s"
        for mode in modes:
            ref = run_json(ref_cmds[mode])
            ref["compile_s"] = compile_seconds(ref)
            rnd[mode] = ref
            rnd[f"ratio_{mode}"] = jx["tokens_per_sec"] / ref["tokens_per_sec"]
            line += (
                f" | reference {mode} {ref['tokens_per_sec']:7.0f} (x{rnd[f'ratio_{mode}']:.2f})"
            )
        rounds.append(rnd)
        log(line)
    # One peak for the whole run: the fastest fp32 matmul any process measured.
    sides = ("jaxlm", *modes)
    peak = max(r[side]["peak_gflops_used"] for r in rounds for side in sides)
    fpt = flops_per_token(CONFIGS[name])
    out = {
        "config": name,
        "shape": CONFIGS[name],
        "jaxlm_settings": settings,
        "flops_per_token": fpt,
        "flops_formula": FLOPS_FORMULA,
        "peak_gflops_run": peak,
        "rounds": rounds,
    }
    for side in sides:
        runs = [r[side] for r in rounds]
        tps = [r["tokens_per_sec"] for r in runs]
        out[side] = {
            "tokens_per_sec": summary(tps),
            "step_time_ms": statistics.median(r["step_time_ms"] for r in runs),
            "mfu": fpt * statistics.median(tps) / (peak * 1e9),
            "own_matmul_peak_gflops": max(r["peak_gflops_used"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "compile_s": statistics.median(r["compile_s"] for r in runs),
            "loss_first": runs[0]["loss_first"],
        }
        if side != "jaxlm":
            out[side]["ratio"] = summary([r[f"ratio_{side}"] for r in rounds])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the reference")
    parser.add_argument("--set", action="append", default=None, help="a jaxlm config override")
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        c = CONFIGS[args.config]
        settings = args.set or []
        print(json.dumps(jax_worker(c, args.steps, args.warmup_steps, settings, args.peak_n)))
        return 0
    if not REFERENCE.is_file():
        raise SystemExit(f"the PyTorch reference is not at {REFERENCE}")
    mode = "compiled" if args.compile else "eager"
    result = compare(
        args.config, args.repeats, args.steps, args.warmup_steps, args.threads, (mode,), args.set
    )
    r = result[mode]["ratio"]
    print(
        f"{args.config}: jaxlm / reference ({mode}) tokens/s = {r['median']:.2f} "
        f"(median of {args.repeats}; min {r['min']:.2f}, max {r['max']:.2f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
