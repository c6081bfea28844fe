"""Training speed of jaxlm beside the PyTorch reference, alternating, in one run.

Both sides train the same GPT-2 (same sizes, vocab, batch, sequence, fp32, AdamW with
clipping) on random tokens; each run is a fresh subprocess, and the runs alternate
jaxlm, torch, jaxlm, torch... so machine noise hits both. Prints a table and JSON:
tokens/s (median, min, max), step time, MFU against the fp32 matmul peak measured in
the same process, compile/warm-up time, and the ratio jaxlm / reference per pair.

    python benchmarks/train_speed.py --config tiny [--repeats 2] [--json out.json]

FLOPs per token are the reference's formula: 6 (N_nonembedding + V d) + 12 L d T.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "torch_gpt_reference.py"
CONFIGS = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, seq_len=256, batch=8, vocab=8192),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch=2, vocab=50304),
}


def flops_per_token(c: dict) -> float:
    d, n_layers, vocab, t = c["d_model"], c["n_layers"], c["vocab"], c["seq_len"]
    non_embedding = n_layers * (12 * d * d + 13 * d) + 2 * d
    return 6 * (non_embedding + vocab * d) + 12 * n_layers * d * t


def jax_worker(c: dict, steps: int, warmup: int) -> dict:
    """One jaxlm measurement, in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlm import sharding as shd
    from jaxlm.config import load_config
    from jaxlm.models import build_model
    from jaxlm.train.optim import make_optimizer, make_schedule
    from jaxlm.train.state import init_state, state_shardings
    from jaxlm.train.step import jit_steps, make_eval_step, make_train_step

    config = load_config(
        None,
        [
            f"model.d_model={c['d_model']}",
            f"model.n_layers={c['n_layers']}",
            f"model.n_heads={c['n_heads']}",
            f"model.vocab_size={c['vocab']}",
            f"model.max_len={c['seq_len']}",
            f"train.seq_len={c['seq_len']}",
            f"train.batch_size={c['batch']}",
            "optim.lr=3e-4",
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
            "mesh.data=1",
        ],
    )
    mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
    rules = shd.logical_rules(config.mesh)
    model = build_model(config.model)
    tx = make_optimizer(config.optim, steps + warmup)
    _, shardings = state_shardings(model, tx, c["seq_len"], mesh, rules)
    state = init_state(model, tx, c["seq_len"], shardings, jax.random.PRNGKey(0), mesh, rules)
    step_fn, _ = jit_steps(
        make_train_step(model, tx, make_schedule(config.optim, steps + warmup)),
        make_eval_step(model),
        shardings,
        mesh,
        rules,
    )
    rng = np.random.default_rng(1)
    shape = (c["batch"], c["seq_len"])

    def batch():
        tokens = rng.integers(0, c["vocab"], (shape[0], shape[1] + 1)).astype(np.int32)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
        }

    def peak_gflops(n: int = 1024) -> float:
        a = jnp.ones((n, n), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            mm(a).block_until_ready()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / statistics.median(times) / 1e9

    peak = peak_gflops()
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step_fn(state, batch())
        metrics["loss"].block_until_ready()
    warm = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        b = batch()
        t = time.perf_counter()
        state, metrics = step_fn(state, b)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t)
    peak = max(peak, peak_gflops())
    tokens = shape[0] * shape[1]
    tps = tokens / statistics.median(times)
    return {
        "tokens_per_sec": tps,
        "tokens_per_sec_min": tokens / max(times),
        "tokens_per_sec_max": tokens / min(times),
        "step_time_ms": statistics.median(times) * 1e3,
        "warmup_seconds": warm,
        "peak_gflops_used": peak,
        "mfu_vs_measured_peak": flops_per_token(c) * tps / (peak * 1e9),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the reference")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    c = CONFIGS[args.config]

    if args.worker:
        print(json.dumps(jax_worker(c, args.steps, args.warmup_steps)))
        return 0

    if not REFERENCE.is_file():
        raise SystemExit(f"the PyTorch reference is not at {REFERENCE}")
    jax_cmd = [sys.executable, __file__, "--worker", "--config", args.config]
    jax_cmd += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    torch_cmd = [sys.executable, str(REFERENCE), "--threads", str(args.threads)]
    torch_cmd += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    for key in ("d_model", "n_layers", "n_heads", "seq_len", "batch", "vocab"):
        torch_cmd += [f"--{key.replace('_', '-')}", str(c[key])]
    if args.compile:
        torch_cmd.append("--compile")

    pairs = []
    for i in range(args.repeats):
        jx, th = run(jax_cmd), run(torch_cmd)
        pairs.append(
            {"jaxlm": jx, "torch": th, "ratio": jx["tokens_per_sec"] / th["tokens_per_sec"]}
        )
        print(
            f"pair {i + 1}: jaxlm {jx['tokens_per_sec']:8.0f} tok/s "
            f"(MFU {jx['mfu_vs_measured_peak']:.0%})   torch {th['tokens_per_sec']:8.0f} tok/s "
            f"(MFU {th['mfu_vs_measured_peak']:.0%})   ratio {pairs[-1]['ratio']:.2f}",
            flush=True,
        )
    ratios = [p["ratio"] for p in pairs]
    summary = {
        "config": args.config,
        "shape": c,
        "flops_per_token": flops_per_token(c),
        "torch_compile": args.compile,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
    }
    print(
        f"{args.config}: jaxlm / torch{' (compiled)' if args.compile else ''} tokens/s = "
        f"{summary['ratio_median']:.2f} (median of {len(ratios)}; "
        f"min {min(ratios):.2f}, max {max(ratios):.2f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
