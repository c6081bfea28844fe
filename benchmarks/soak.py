"""Soak benchmark: thousands of tiny steps with frequent checkpoints; RSS must stay flat.

Runs `jaxlm train` as a subprocess and samples its resident memory from /proc while
it trains. Leaks in the loop (metrics kept on device, checkpoint buffers, iterator
state) show up as growth over the second half of the run, after warm-up.

    python benchmarks/soak.py [--steps 3000] [--every 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_len=64",
    "tokenizer.vocab_size=512",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.eval_every=1000000",
    "train.sample_tokens=0",
]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50, help="checkpoint interval")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", help="write the samples and summary here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "jaxlm.cli",
            "train",
            str(REPO / "configs" / "shakespeare.yaml"),
            *TINY,
            f"train.steps={args.steps}",
            f"train.log_every={args.every}",
            f"checkpoint.every={args.every}",
            "--run-dir",
            tmp,
            "--no-progress",
        ]
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int, float]] = []  # (seconds, step, RSS MiB)
        metrics = Path(tmp) / "metrics.jsonl"
        while proc.poll() is None:
            rss = rss_mib(proc.pid)
            step = len(metrics.read_text().splitlines()) * args.every if metrics.exists() else 0
            if rss is not None and step > 0:
                samples.append((time.time() - start, step, rss))
            time.sleep(args.interval)
        stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0 or len(samples) < 4:
        print(stderr, file=sys.stderr)
        print(f"soak: training failed (exit {proc.returncode})", file=sys.stderr)
        return 1

    half = [s for s in samples if s[1] >= args.steps // 2]
    growth = (half[-1][2] - half[0][2]) / half[0][2]
    summary = {
        "steps": args.steps,
        "checkpoint_every": args.every,
        "seconds": round(samples[-1][0], 1),
        "rss_first_mib": round(samples[0][2], 1),
        "rss_mid_mib": round(half[0][2], 1),
        "rss_last_mib": round(half[-1][2], 1),
        "rss_peak_mib": round(max(s[2] for s in samples), 1),
        "growth_last_half": round(growth, 4),
    }
    print("  time(s)   step   RSS(MiB)")
    stride = max(1, len(samples) // 12)
    for t, step, rss in [*samples[::stride], samples[-1]]:
        print(f"  {t:7.1f} {step:6d} {rss:10.1f}")
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples}))
    ok = growth < 0.05
    print(f"RSS growth over the last half: {growth:+.2%} ({'ok' if ok else 'over 5%'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
