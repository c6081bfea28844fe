"""Tokens/s the grain input pipeline delivers on its own, from raw text and from shards.

`--source text` (the default, what benchmarks/run.py calls): jaxlm/data/pipeline.py's
`make_dataset` fed tinyshakespeare's paragraphs with a sentencepiece BPE tokenizer
trained on them: tokenize + pack + batch. Divide by the trainer's consumption (the
jaxlm tokens/s of train_speed.py at the same batch and sequence) for the headroom.

`--source shards`: the corpus is first written by `jaxlm data prepare` (not timed);
the timed part is the training path of a run with `data.path=DIR` on one host: the lazy
ArrayRecord source, the index shuffle, `[BOS] ids [EOS]`, packing and batching
(jaxlm/data/mixture.py's `examples_stream` under `make_dataset`). `--source both`
measures the two, `--repeats` times each, and sets them against what a 1B Llama eats
on one TPU v5e host (8 chips): the FLOPs per token of configs/llama-1b.yaml (jaxlm
info's formula, seq 2048) against v5e's 197 bf16 TFLOP/s per chip at 100% MFU. That is
a ceiling on consumption, so the headroom printed is a floor.

Tokens/s per CPU core is tokens over the process's CPU seconds (user + system, all
threads) while the batches were drawn.

    python benchmarks/pipeline_speed.py [--batches 200] [--seq-len 256] [--batch 8]
    python benchmarks/pipeline_speed.py --source both --seq-len 2048 --batch 32 \\
        --batches 20 --repeats 5 [--join 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO

CORPUS = REPO / "data" / "tinyshakespeare.txt"
V5E_PEAK_BF16_TFLOPS = 197.0  # cloud.google.com/tpu/docs/v5e, as jaxlm/aot_estimate.py
V5E_HOST_CHIPS = 8


def _docs(n_docs: int, join: int = 1) -> list[str]:
    """tinyshakespeare's paragraphs, `join` to a document (web documents are a few
    hundred tokens; a paragraph here is about 60)."""
    paras = [p for p in CORPUS.read_text().split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i : i + join]) for i in range(0, len(paras), join)]
    return docs[: n_docs or None]


def _time(ds, batches: int) -> dict:
    it = iter(ds)
    next(it)  # builds the iterator chain, opens the readers
    tokens = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        tokens += int(next(it)["inputs"].size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tokens_per_sec": tokens / seconds, "tokens_per_cpu_sec": tokens / cpu}


def measure(
    batches: int, seq_len: int, batch: int, vocab: int = 2048, n_docs: int = 0, join: int = 1
) -> dict:
    """The raw-text path: tokenize + pack + batch."""
    from jaxlm.data.pipeline import make_dataset
    from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer

    docs = _docs(n_docs, join)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(train_tokenizer(docs, Path(tmp) / "tok.model", vocab))
    ds = make_dataset(docs, tokenizer, seq_len=seq_len, batch_size=batch, seed=0)
    return {
        **_time(ds, batches),
        "batches": batches,
        "seq_len": seq_len,
        "batch": batch,
        "tokenizer_vocab": vocab,
        "documents": len(docs),
    }


def measure_shards(shard_dir: Path, batches: int, seq_len: int, batch: int) -> dict:
    """The token-shard path of a run with data.path=shard_dir, on one host."""
    from jaxlm.config import load_config
    from jaxlm.data.mixture import token_data
    from jaxlm.data.pipeline import make_dataset

    config = load_config(REPO / "configs" / "llama-tiny.yaml", [f"data.path={shard_dir}"])
    with tempfile.TemporaryDirectory() as run_dir:
        from etils import epath

        train, _, tokenizer, make_stream = token_data(config, epath.Path(run_dir))
    ds = make_dataset(
        train, tokenizer, seq_len=seq_len, batch_size=batch, seed=0, make_stream=make_stream
    )
    return _time(ds, batches)


def prepare_shards(out: Path, vocab: int, copies: int, join: int) -> dict:
    """`_docs` `copies` times over (as JSONL files), through `jaxlm data prepare`."""
    from jaxlm.config import load_config
    from jaxlm.data.shards import prepare

    src = out / "corpus"
    src.mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in _docs(0, join))
    for i in range(copies):
        (src / f"part-{i:03d}.jsonl").write_text(lines)
    config = load_config(None, [f"data.path={src}", f"tokenizer.vocab_size={vocab}"])
    t0 = time.perf_counter()
    manifest = prepare(config, out / "shards", workers=1, shard_bytes=1 << 20, progress=False)
    return {
        "prepare_s": time.perf_counter() - t0,
        "tokens": manifest["tokens"],
        "tokens_per_document": manifest["tokens"] / manifest["records"],
    }


def v5e_llama1b_consumption() -> dict:
    """Tokens/s one v5e host (8 chips) trains a 1B Llama at, at 100% MFU: a ceiling."""
    from jaxlm.config import load_config
    from jaxlm.info import model_info

    info = model_info(load_config(REPO / "configs" / "llama-1b.yaml"))
    per_chip = V5E_PEAK_BF16_TFLOPS * 1e12 / info.flops_per_token
    return {
        "flops_per_token": info.flops_per_token,
        "seq_len": info.seq_len,
        "per_chip_tokens_per_sec": per_chip,
        "host_tokens_per_sec": per_chip * V5E_HOST_CHIPS,
    }


def _spread(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(args: argparse.Namespace) -> dict:
    out: dict = {"seq_len": args.seq_len, "batch": args.batch, "batches": args.batches}
    out["paragraphs_per_document"] = args.join
    if args.source in ("shards", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            out["prepare"] = prepare_shards(Path(tmp), args.vocab, args.copies, args.join)
            runs = [
                measure_shards(Path(tmp) / "shards", args.batches, args.seq_len, args.batch)
                for _ in range(args.repeats)
            ]
        out["shards"] = {k: _spread(runs, k) for k in runs[0]}
    if args.source in ("text", "both"):
        runs = [
            measure(args.batches, args.seq_len, args.batch, args.vocab, args.docs, args.join)
            for _ in range(args.repeats)
        ]
        out["text"] = {k: _spread(runs, k) for k in ("tokens_per_sec", "tokens_per_cpu_sec")}
    v5e = v5e_llama1b_consumption()
    out["v5e_llama1b"] = v5e
    for path in ("shards", "text"):
        if path in out:
            per_core = out[path]["tokens_per_cpu_sec"]["median"]
            out[path]["headroom_per_core"] = per_core / v5e["host_tokens_per_sec"]
            out[path]["cores_for_one_host"] = v5e["host_tokens_per_sec"] / per_core
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("text", "shards", "both"), default="text")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048, help="of the BPE tokenizer")
    parser.add_argument("--docs", type=int, default=0, help="first N paragraphs (0 = all)")
    parser.add_argument("--repeats", type=int, default=1, help="with --source shards/both")
    parser.add_argument("--copies", type=int, default=4, help="tinyshakespeares in the shards")
    parser.add_argument("--join", type=int, default=1, help="paragraphs per document")
    args = parser.parse_args()
    if args.source == "text" and args.repeats == 1:  # benchmarks/run.py's contract
        print(json.dumps(measure(args.batches, args.seq_len, args.batch, args.vocab, args.docs)))
        return 0
    result = compare(args)
    print(json.dumps(result))
    v5e = result["v5e_llama1b"]
    print(
        f"1B Llama on a v5e host: {v5e['host_tokens_per_sec']:.0f} tokens/s at most "
        f"({V5E_HOST_CHIPS} chips x {v5e['per_chip_tokens_per_sec']:.0f}; "
        f"{v5e['flops_per_token']:.3g} FLOP/token at seq {v5e['seq_len']}, "
        f"{V5E_PEAK_BF16_TFLOPS:.0f} TFLOP/s/chip, MFU 100%)",
        file=sys.stderr,
    )
    for path in ("shards", "text"):
        if path in result:
            r = result[path]
            t, c = r["tokens_per_sec"], r["tokens_per_cpu_sec"]
            print(
                f"{path}: {t['median']:.0f} tokens/s [{t['min']:.0f}-{t['max']:.0f}], "
                f"{c['median']:.0f} per CPU core [{c['min']:.0f}-{c['max']:.0f}]; one core "
                f"feeds {r['headroom_per_core']:.2f}x the host, "
                f"{r['cores_for_one_host']:.2f} cores per host needed",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
