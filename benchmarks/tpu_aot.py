"""The TPU compiler's estimates for the presets: `jaxlm compile --json` per case, one table.

No TPU is used: libtpu compiles the real train step for the topology on this CPU, and
every time, tokens/s and MFU below is its cost model's estimate (see `jaxlm/aot_estimate.py`
for how the whole step is priced). Each case is a fresh `jaxlm compile` subprocess, one
after another (a 7B compile takes minutes and GBs of RAM on a 2-core host).

    python benchmarks/tpu_aot.py                          # the two preset cases
    python benchmarks/tpu_aot.py --cases tiny-check       # seconds: whole step vs unrolled
    python benchmarks/tpu_aot.py --cases llama1b-v5e8 --extra model.remat=full
    python benchmarks/tpu_aot.py --json out.json

The MaxText column is the harness's figure for the same model, topology, sequence and
per-chip batch (../shared/bench/maxtext_aot/results.md, splash attention, which the cost
model does not price); it compares only where remat and attention match, too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxlm.aot import parse_topology  # noqa: E402
from jaxlm.aot_search import MESHES, cache_path  # noqa: E402
from jaxlm.config import load_config  # noqa: E402

GIB = 1024**3


@dataclass(frozen=True)
class Case:
    config: str  # a preset, or "" for the tiny model
    topology: str
    chips: int
    seq_len: int
    per_chip_batch: int
    maxtext_seconds: float = 0.0  # the harness's estimate at this batch and sequence
    maxtext_note: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # The harness's price of attention, which the cost model leaves out (splash is a
    # kernel without a cost estimate): the four splash passes of every layer (forward,
    # forward rerun by remat, dq, dkv) at the cost model's own matmul rate, for this
    # batch and sequence. A remat that keeps "context" runs three (MaxText's too).
    attention_seconds: float = 0.0
    maxtext_passes: int = 4


FSDP = MESHES["fsdp"]  # as `jaxlm compile --search` names it, so the two share compiles
TINY = (
    "model.family=llama",
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.max_len=128",
    "model.vocab_size=512",
    "tokenizer.vocab_size=512",
)
CASES = {
    # Issue #18's two cases; MaxText: splash attention, its remat given in the note.
    "llama7b-v5p8": Case(
        "configs/llama-7b.yaml", "v5p-8", 4, 4096, 8, 4.459, "full", FSDP, 0.375, 4
    ),
    "llama1b-v5e8": Case(
        "configs/llama-1b.yaml", "v5e-8", 8, 2048, 4, 0.384, "minimal_with_context", FSDP, 0.034, 3
    ),
    # Seconds: the scanned step's whole-step estimate beside a compile of the unrolled
    # step (see `check_unrolled`).
    "tiny-check": Case("", "v5e-2x2", 4, 128, 2, overrides=(*TINY, *FSDP)),
}


def compile_case(
    case: Case, extra: list[str], timeout: int, fresh: bool = False, cached_only: bool = False
) -> dict:
    """`jaxlm compile --json` for one case, in a fresh process; its JSON and wall time
    (with `cached_only`, {} where no record is cached).

    The record is kept in `jaxlm compile --search`'s cache (keyed by the resolved config,
    topology and versions), so a case a search already compiled costs nothing."""
    overrides = [
        *case.overrides,
        f"train.batch_size={case.per_chip_batch * case.chips}",
        f"train.seq_len={case.seq_len}",
        f"model.max_len={case.seq_len}",
        *extra,
    ]
    config = load_config(case.config or None, overrides)
    cached = cache_path(config, parse_topology(case.topology))
    if cached.exists() and not fresh:
        return {**json.loads(cached.read_text()), "wall_s": "cached"}
    if cached_only:
        return {}
    words = [case.config] if case.config else []
    words += overrides
    cmd = [sys.executable, "-m", "jaxlm.cli", "compile", *words, "--topology", case.topology]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.time()
    try:
        out = subprocess.run(
            [*cmd, "--json"], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"compile ran past --timeout {timeout} s", "wall_s": timeout}
    wall = round(time.time() - t0, 1)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return {"error": f"rc {out.returncode}: {out.stderr.strip()[-400:]}", "wall_s": wall}
    record = json.loads(out.stdout.strip().splitlines()[-1])
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record))
    return {**record, "wall_s": wall}


def row(name: str, case: Case, r: dict) -> str:
    if "memory_bytes" not in r:
        return f"| {name} | {r.get('error', '?')} |" + " |" * (HEAD.count("|") - 3)
    est = r["estimate"] or {}
    mem = r["memory_bytes"]["total"]
    fits = "yes" if r["fits"] else "no (OOM)" if r["error"] else "no"
    coll = r["collectives"]

    def nb(kind: str) -> str:
        return f"{coll[kind]['count']:,} / {coll[kind]['bytes'] / GIB:.2f}"

    # A scanned program holds one layer's kernel calls: its splash passes per layer.
    passes = r["kernel_calls"] if r["kernels"] else 0
    if est.get("step_seconds"):
        s = est["step_seconds"]
        s_attn = s + case.attention_seconds * passes / 4
        model_chip = r["model_flops_per_step"] / r["chips"]
        figures = (
            f"{s:.4g} | {s_attn:.4g} | {est['tokens_per_s_per_chip']:,.0f} | "
            f"{100 * est['mfu']:.1f}% | {est['xla_flops_per_chip'] / model_chip:.2f}"
        )
        mt_attn = case.maxtext_seconds + case.attention_seconds * case.maxtext_passes / 4
        ratio = (
            f"{s / case.maxtext_seconds:.3f}x | {s_attn / mt_attn:.3f}x"
            if case.maxtext_seconds
            else "- | -"
        )
    else:
        why = est.get("unavailable", "not estimated")
        figures, ratio = f"unavailable: {why} | - | - | - | -", "- | -"
    maxtext = "-"
    if case.maxtext_seconds:
        mt_attn = case.maxtext_seconds + case.attention_seconds * case.maxtext_passes / 4
        maxtext = f"{case.maxtext_seconds} / {mt_attn:.4g} ({case.maxtext_note})"
    kernels = "splash" if any("splash" in k for k in r["kernels"]) else "XLA"
    return (
        f"| {name} | {kernels} ({passes} passes) | {fits} | "
        f"{mem / GIB:.2f} of {r['hbm_bytes'] / GIB:.0f} | "
        f"{figures} | {nb('all-gather')} | {nb('reduce-scatter')} | "
        f"{coll['all-reduce']['count']:,} | {nb('collective-permute')} | {maxtext} | "
        f"{ratio} | {r['wall_s']} |"
    )


HEAD = (
    "| case | attention | fits | GiB/chip | est. step s | +attn s | tokens/s/chip | est. MFU "
    "| XLA/model FLOPs | AG n / GiB | RS n / GiB | AR n | CP n / GiB | MaxText est. s / +attn "
    "| jaxlm/MaxText | +attn | wall s |"
)


def check_unrolled(case: Case, scanned: dict, extra: list[str], timeout: int) -> str:
    """The scanned step's whole-step estimate against the unrolled step compiled as is."""
    flat = compile_case(case, [*extra, "model.scan_layers=false"], timeout, fresh=True)
    a, b = scanned.get("estimate") or {}, flat.get("estimate") or {}
    if not (a.get("step_seconds") and b.get("step_seconds")):
        return f"check: no estimate to compare ({a.get('unavailable')}; {b.get('unavailable')})"
    dt = a["step_seconds"] / b["step_seconds"] - 1
    df = a["xla_flops_per_chip"] / b["xla_flops_per_chip"] - 1
    return (
        f"check: scanned step's whole-step estimate {a['step_seconds']:.6g} s, "
        f"{a['xla_flops_per_chip']:.6g} FLOP/chip; unrolled step compiled as is "
        f"{b['step_seconds']:.6g} s, {b['xla_flops_per_chip']:.6g} FLOP/chip: "
        f"{100 * dt:+.2f}% time, {100 * df:+.2f}% FLOPs; the scanned program alone counts "
        f"{scanned['xla_flops_per_chip_compiled']:.6g} FLOP/chip (a layer once)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["llama7b-v5p8", "llama1b-v5e8"])
    ap.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every case")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--fresh", action="store_true", help="compile even where a record is cached")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    records, lines, checks = {}, [HEAD, "|" + "---|" * (HEAD.count("|") - 1)], []
    for name in args.cases:
        case = CASES[name]
        print(f"[{time.strftime('%H:%M:%S')}] compiling {name} ...", file=sys.stderr, flush=True)
        records[name] = compile_case(case, args.extra, args.timeout, args.fresh)
        lines.append(row(name, case, records[name]))
        if name == "tiny-check":
            checks.append(check_unrolled(case, records[name], args.extra, args.timeout))
    print("Compiler's estimates (libtpu's cost model on this CPU; no TPU ran anything):")
    print("\n".join(lines + checks))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
