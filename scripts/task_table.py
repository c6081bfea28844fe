"""The README's task table: does pretraining on English text help on each task?

For every task of `jaxlm eval --task` (summarization, qa, translation, dialogue) the
same small decoder (configs/tasks/finetune.yaml) is trained on the task's bundled train
split for the same number of steps twice: (a) from a model pretrained on an English
corpus (configs/tasks/pretrain-english.yaml) and (b) from scratch. Both use the
pretrained run's tokenizer, so the starting weights are the only difference. Extractive
QA does the same with a tiny BERT (configs/bert-qa-tiny.yaml, pretrained with MLM + NSP
by configs/bert-tiny.yaml). Each row is then scored on the task's held-out test split by
`jaxlm eval --task`.

    python scripts/task_table.py [--corpus ../shared/data/english_corpus] [--out DIR]

Every command is printed as it runs, with its minutes; rows already in DIR/results.jsonl
are not run again, so an interrupted table resumes. The table (markdown) is printed at
the end and written to DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The pretrained models: config and overrides (the corpus is added).
PRETRAIN = {
    "decoder": ["configs/tasks/pretrain-english.yaml"],
    # bert-qa-tiny's body: position embeddings are weights, so max_len must match.
    "bert": [
        "configs/bert-tiny.yaml",
        "model.max_len=128",
        "train.seq_len=128",
        "tokenizer.vocab_size=1024",
    ],
}
# Per row: the model it starts from, its config, how `jaxlm eval --task` scores it.
TASKS = {
    "summarization": {
        "model": "decoder",
        "new_tokens": 64,
        "metrics": ("rouge1", "rouge2", "rougeL"),
    },
    "qa": {"model": "decoder", "new_tokens": 24, "metrics": ("exact_match", "f1")},
    "translation": {"model": "decoder", "new_tokens": 96, "metrics": ("bleu", "chrf")},
    "dialogue": {"model": "decoder", "new_tokens": 0, "metrics": ("perplexity",)},
    "qa-extractive": {"model": "bert", "new_tokens": 0, "metrics": ("exact_match", "f1")},
}
CONFIGS = {"decoder": "configs/tasks/finetune.yaml", "bert": "configs/bert-qa-tiny.yaml"}
STARTS = ("pretrained", "scratch")


def run(cmd: list[str], log: Path) -> float:
    """Run a jaxlm command (printed as a user types it); minutes taken."""
    shown = "jaxlm " + shlex.join(cmd)
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    if done.returncode:
        sys.exit(f"failed (exit {done.returncode}): {shown}; see {log}")
    minutes = (time.perf_counter() - start) / 60
    print(f"  {minutes:.1f} min", flush=True)
    return minutes


def task_data(name: str, out: Path) -> Path | None:
    """A decoder task's training file: prompt/completion records in the evaluation's
    prompt convention (jaxlm.evaluation.tasks.training_records); dialogue's are the
    bundled conversations; extractive QA reads its config's own (None)."""
    from jaxlm.evaluation.tasks import TASKS as REGISTRY
    from jaxlm.evaluation.tasks import task_file, training_records

    if TASKS[name]["model"] != "decoder":
        return None
    if not REGISTRY[name].generated:
        return task_file(name, "train")
    path = out / f"{name}.sft.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in training_records(name)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pretrain(kind: str, out: Path, args: argparse.Namespace) -> Path:
    """The pretrained run of `kind`, trained unless DIR already holds it."""
    run_dir = out / f"pretrained-{kind}"
    if not any(run_dir.glob("checkpoints/*")):
        cmd = ["train", *PRETRAIN[kind][:1], "--run-dir", str(run_dir), "--no-progress"]
        cmd += [*PRETRAIN[kind][1:], f"data.path={Path(args.corpus).resolve()}"]
        run([*cmd, *args.pretrain_set], out / f"pretrained-{kind}.log")
    return run_dir


def row(name: str, start: str, out: Path, pretrained: Path, args: argparse.Namespace) -> dict:
    spec = TASKS[name]
    run_dir = out / f"{name}-{start}"
    train = ["train", CONFIGS[spec["model"]], "--run-dir", str(run_dir), "--no-progress"]
    data = task_data(name, out)
    if data is not None:
        train.append(f"data.path={data}")
    train.append(f"tokenizer.path={pretrained / 'tokenizer.model'}")
    if start == "pretrained":
        train.append(f"init_from={pretrained}")
    train += args.set
    minutes = run(train, out / f"{name}-{start}.train.log")
    scores = out / f"{name}-{start}.json"
    task = name.removesuffix("-extractive")
    evaluate = ["eval", str(run_dir), "--task", task, "--json", str(scores), "--batch-size", "16"]
    if spec["new_tokens"]:
        evaluate += ["--max-new-tokens", str(spec["new_tokens"])]
    if args.max_examples:
        evaluate += ["--max-examples", str(args.max_examples)]
    minutes += run(evaluate, out / f"{name}-{start}.eval.log")
    result = json.loads(scores.read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {
        "task": name,
        "start": start,
        "minutes": round(minutes, 1),
        "final_eval_loss": round(evals[-1], 3) if evals else None,
        "metrics": {k: result[k] for k in spec["metrics"] if k in result},
        "commands": ["jaxlm " + shlex.join(train), "jaxlm " + shlex.join(evaluate)],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| task | start | metric (test split) | held-out loss | minutes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
        lines.append(
            f"| {r['task']} | {r['start']} | {metrics} | {r['final_eval_loss']} | {r['minutes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "english_corpus"))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "task-table")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--pretrain-set", nargs="*", default=[], help="key=value for pretraining")
    ap.add_argument("--set", nargs="*", default=[], help="key=value for every task run")
    ap.add_argument("--max-examples", type=int, default=0, help="score only the first N")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = []
    if results_file.exists():
        done = [json.loads(line) for line in results_file.read_text().splitlines()]
    have = {(r["task"], r["start"]) for r in done}
    for name in args.tasks:
        pretrained = pretrain(TASKS[name]["model"], out, args)
        for start in STARTS:
            if (name, start) in have:
                continue
            result = row(name, start, out, pretrained, args)
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
    order = {(t, s): i for i, (t, s) in enumerate((t, s) for t in TASKS for s in STARTS)}
    text = table(sorted(done, key=lambda r: order[(r["task"], r["start"])]))
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
