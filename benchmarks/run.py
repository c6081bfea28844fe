"""The benchmark suite in one command: jaxlm beside the PyTorch reference, in one run.

    python benchmarks/run.py                      # tiny and GPT-2 small, everything
    python benchmarks/run.py --configs tiny --repeats 3 --json out.json
    python benchmarks/run.py --smoke              # seconds: a very small model, 2 steps

Sections (each one is also a script of its own in this folder):
- train: tokens/s (median, min, max), step time, FLOPs/token (the reference's formula),
  MFU against the fastest fp32 matmul measured in the run, peak RSS, compile time, and
  jaxlm / reference per round, against the reference eager and with torch.compile;
- pipeline: tokens/s of the grain pipeline alone, against the trainer's consumption;
- checkpoint: async save as the loop sees it (% of a step), and restore;
- compile: the train step's compile time, 24 scanned layers against 2;
- generation: benchmarks/generate_speed.py's figures, when that script is present.

Every measurement runs in a fresh process; jaxlm and the reference alternate, so load
from other processes hits both. The machine's load average is printed beside the
figures, since on a shared machine it says how far to trust them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_time
import train_speed
from bench_common import REPO, load_average, python, run_json, torch_available

HERE = Path(__file__).resolve().parent
GENERATE = HERE / "generate_speed.py"
SECTIONS = ("train", "pipeline", "checkpoint", "compile", "generation")
TARGETS = {  # the bars
    "ratio_eager": 1.3,
    "ratio_compiled": 1.0,
    "pipeline_headroom": 20.0,
    "checkpoint_pct": 5.0,
    "compile_ratio": 1.5,
}


def train_section(args, log) -> list[dict]:
    modes = () if not args.with_reference else ("eager",) if args.smoke else ("eager", "compiled")
    out = []
    for name in args.configs:
        log(f"train {name} ({', '.join(('jaxlm', *modes))}, {args.repeats} rounds)")
        out.append(
            train_speed.compare(
                name,
                args.repeats,
                args.steps,
                args.warmup_steps,
                args.threads,
                modes,
                peak_n=256 if args.smoke else 2048,
                log=log,
            )
        )
    return out


def pipeline_section(args, train: list[dict]) -> dict:
    name = "smoke" if args.smoke else "tiny"
    c = train_speed.CONFIGS[name]
    cmd = [python(), str(HERE / "pipeline_speed.py"), "--batches", str(5 if args.smoke else 300)]
    cmd += ["--seq-len", str(c["seq_len"]), "--batch", str(c["batch"])]
    cmd += ["--docs", "300", "--vocab", "512"] if args.smoke else []
    result = run_json(cmd)
    consumed = next(
        (t["jaxlm"]["tokens_per_sec"]["median"] for t in train if t["config"] == name), None
    )
    if consumed:
        result["trainer_tokens_per_sec"] = consumed
        result["headroom"] = result["tokens_per_sec"] / consumed
    return result


def checkpoint_section(args) -> dict:
    name = "smoke" if args.smoke else "tiny"
    cmd = [python(), str(HERE / "checkpoint_cost.py"), "--config", name]
    cmd += ["--saves", "2" if args.smoke else "8", "--every", "2" if args.smoke else "5"]
    return run_json(cmd)


def compile_section(args) -> dict:
    few, many = (1, 2) if args.smoke else (2, 24)
    rows = {few: [], many: []}
    for _ in range(1 if args.smoke else 2):
        for n in (few, many):
            rows[n].append(compile_time.measure(n, True, "einsum")["compile_s"])
    med = {n: sorted(v)[len(v) // 2] for n, v in rows.items()}
    return {"layers": [few, many], "compile_s": med, "ratio": med[many] / med[few]}


def generation_section(args) -> dict | None:
    """generate_speed.py's own JSON (new tokens/s at batch 1 and 8 beside the reference's
    KV-cache loop and HF generate), for the run's configs; None when it isn't there."""
    configs = [c for c in args.configs if c in ("tiny", "gpt2-small")]
    if not GENERATE.is_file() or not configs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generate.json"
        cmd = [python(), str(GENERATE), "--configs", *configs, "--repeats", str(args.repeats)]
        done = subprocess.run([*cmd, "--json", str(path)], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0 or not path.is_file():
            return {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
        result = json.loads(path.read_text())
        return {"stdout": done.stdout.strip().splitlines()[-12:], "results": result}


def train_table(train: list[dict]) -> list[str]:
    head = (
        f"{'config':<11} {'side':<19} {'tok/s med':>9} {'[min-max]':>15} {'step ms':>8} "
        f"{'MFU':>5} {'RSS MB':>7} {'compile s':>9} {'jaxlm/ref [min-max]':>21}"
    )
    lines = [head, "-" * len(head)]
    for t in train:
        for side in ("jaxlm", "eager", "compiled"):
            if side not in t:
                continue
            s = t[side]
            tps = s["tokens_per_sec"]
            label = "jaxlm" if side == "jaxlm" else f"reference {side}"
            ratio = ""
            if "ratio" in s:
                r = s["ratio"]
                ratio = f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
            spread = f"[{tps['min']:.0f}-{tps['max']:.0f}]"
            lines.append(
                f"{t['config']:<11} {label:<19} {tps['median']:>9.0f} "
                f"{spread:>15} {s['step_time_ms']:>8.1f} "
                f"{s['mfu']:>5.0%} {s['peak_rss_mb']:>7.0f} {s['compile_s']:>9.1f} {ratio:>21}"
            )
        lines.append(
            f"{'':<11} FLOPs/token {t['flops_per_token']:.4g} = {t['flops_formula']}; "
            f"run peak {t['peak_gflops_run']:.0f} GFLOP/s (fp32 matmul)"
        )
    return lines


def report(results: dict) -> list[str]:
    lines = [f"load average at start: {results['load_start']}", ""]
    if results.get("train"):
        lines += [*train_table(results["train"]), ""]
    p = results.get("pipeline")
    if p:
        extra = ""
        if "headroom" in p:
            extra = (
                f" = {p['headroom']:.1f}x the trainer's {p['trainer_tokens_per_sec']:.0f} "
                f"(target >= {TARGETS['pipeline_headroom']:.0f}x)"
            )
        lines.append(f"pipeline: {p['tokens_per_sec']:.0f} tokens/s alone{extra}")
    c = results.get("checkpoint")
    if c:
        lines.append(
            f"checkpoint ({c['config']}, {c['state_mb']:.0f} MB state): save blocks "
            f"{c['save_call_ms']:.1f} ms + polls {c['poll_calls_ms']:.1f} ms + "
            f"{c['in_flight_slowdown_ms']:.1f} ms slower steps while writing = "
            f"{c['save_pct_of_step']:.1f}% (quartiles {c['save_pct_quartiles']}) of a "
            f"{c['step_ms']:.0f} ms step (target <= {TARGETS['checkpoint_pct']:.0f}%); the save "
            f"took {c['save_cpu_ms']:.0f} ms CPU; restore {c['restore_ms']:.0f} ms"
        )
    k = results.get("compile")
    if k:
        few, many = k["layers"]
        lines.append(
            f"compile: {many} scanned layers {k['compile_s'][many]:.2f} s vs {few}: "
            f"{k['compile_s'][few]:.2f} s = {k['ratio']:.2f}x (target <= "
            f"{TARGETS['compile_ratio']}x)"
        )
    g = results.get("generation")
    if g is not None:
        shown = g.get("stdout", g.get("error", []))
        lines += ["generation (benchmarks/generate_speed.py):", *shown]
    lines.append(f"load average at end: {results['load_end']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "gpt2-small"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="the reference's torch threads")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="a very small model, 2 steps")
    parser.add_argument("--no-reference", dest="with_reference", action="store_false")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.repeats, args.steps, args.warmup_steps = ["smoke"], 1, 2, 1
    elif args.steps is None:
        args.steps = 8
    if args.with_reference and not torch_available():
        print("torch or the reference is missing: jaxlm runs alone")
        args.with_reference = False

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    results: dict = {"load_start": load_average(), "argv": sys.argv[1:]}
    results["train"] = train_section(args, log) if "train" in args.only else []
    if "pipeline" in args.only:
        log("pipeline")
        results["pipeline"] = pipeline_section(args, results["train"])
    if "checkpoint" in args.only:
        log("checkpoint")
        results["checkpoint"] = checkpoint_section(args)
    if "compile" in args.only and not args.smoke:
        log("compile")
        results["compile"] = compile_section(args)
    if "generation" in args.only and not args.smoke:
        log("generation")
        results["generation"] = generation_section(args)
    results["load_end"] = load_average()
    results["seconds"] = time.time() - t0
    print()
    print("\n".join(report(results)))
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
