"""Tokens/s the grain input pipeline delivers on its own: tokenize + pack + batch.

The pipeline is jaxlm/data/pipeline.py's `make_dataset`, fed tinyshakespeare's
paragraphs with a sentencepiece BPE tokenizer trained on them (the same code a run
uses); nothing else runs in the process. Divide by the trainer's consumption (the
jaxlm tokens/s of train_speed.py at the same batch and sequence) for the headroom; the
issue's bar is 20x, so input never stalls a step.

    python benchmarks/pipeline_speed.py [--batches 200] [--seq-len 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO

CORPUS = REPO / "data" / "tinyshakespeare.txt"


def measure(batches: int, seq_len: int, batch: int, vocab: int = 2048, n_docs: int = 0) -> dict:
    from jaxlm.data.pipeline import make_dataset
    from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer

    docs = [p for p in CORPUS.read_text().split("\n\n") if p.strip()][: n_docs or None]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(train_tokenizer(docs, Path(tmp) / "tok.model", vocab))
    ds = make_dataset(docs, tokenizer, seq_len=seq_len, batch_size=batch, seed=0)
    it = iter(ds)
    next(it)  # builds the iterator chain
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        b = next(it)
        tokens += int(b["inputs"].size)
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_sec": tokens / seconds,
        "batches": batches,
        "seq_len": seq_len,
        "batch": batch,
        "tokenizer_vocab": vocab,
        "documents": len(docs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048, help="of the BPE tokenizer")
    parser.add_argument("--docs", type=int, default=0, help="first N paragraphs (0 = all)")
    args = parser.parse_args()
    print(json.dumps(measure(args.batches, args.seq_len, args.batch, args.vocab, args.docs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
