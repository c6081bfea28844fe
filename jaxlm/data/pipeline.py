"""The grain pipeline: documents -> tokens -> packed rows -> batches.

Each document becomes `[BOS] tokens [EOS]`, shifted into inputs and targets *before*
packing, so no target is ever the first token of the next document. Rows carry
segment ids (0 = padding) and per-document positions, which the model turns into a
block-diagonal causal mask. The iterator is a grain `DatasetIterator`, whose state
goes into every checkpoint so a resumed run sees exactly the next batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import partial
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from jaxlm.data.sources import LazySequence, max_chars
from jaxlm.errors import JaxlmError

Batch = dict[str, np.ndarray]

# Tokenizing threads and read-ahead. grain's default (16 threads, 500 documents ahead)
# spends its time polling the read-ahead buffer on small hosts; this is several times
# faster there (figures in benchmarks/README.md). Order and content don't depend on it.
READ_OPTIONS = grain.ReadOptions(num_threads=min(os.cpu_count() or 1, 16), prefetch_buffer_size=64)


class SplitView(LazySequence):
    """The train or eval records of a sequence, by the rule of `split_documents`."""

    def __init__(self, base: Sequence[Any], fraction: float, held_out: bool) -> None:
        self.base, self.held_out = base, held_out
        self.n = len(base)
        ratio = Fraction(fraction).limit_denominator(1_000_000)  # 0.1 is exactly 1/10
        self.p, self.q = ratio.numerator, ratio.denominator
        self.n_eval = self._evals_before(self.n)
        self.tail = self.n_eval == 0  # too few records for the rule: the last one
        if self.tail:
            self.n_eval = 1

    def _evals_before(self, g: int) -> int:
        return g * self.p // self.q

    def __len__(self) -> int:
        return self.n_eval if self.held_out else self.n - self.n_eval

    def _get(self, i: int) -> Any:
        return self.base[self.record(i)]

    def record(self, i: int) -> int:
        """The base index of this split's `i`th record (O(1), no table)."""
        if self.tail:
            return self.n - 1 if self.held_out else i
        if self.held_out:  # the smallest g with floor((g + 1) p / q) > i
            return -(-(i + 1) * self.q // self.p) - 1
        g = i * self.q // (self.q - self.p)  # about right; the loops move it at most a step
        while g + 1 - self._evals_before(g + 1) <= i:
            g += 1
        while g - self._evals_before(g) > i:
            g -= 1
        return g

    def max_chars(self) -> int | None:
        return max_chars(self.base)


def split_documents(docs: Sequence[Any], eval_fraction: float) -> tuple[Sequence, Sequence]:
    """Train and eval views of `docs`, chosen from record numbers alone.

    Record g is held out when floor((g + 1) * f) > floor(g * f) (f = eval_fraction):
    one record in every 1/f, spread evenly over the corpus, the same on every host and
    in every run, and found without reading a document; each split maps its indices to
    records by arithmetic, so it costs no memory per record (a hash of each record id
    would need a table of the train records on every host). A corpus too small for
    one held-out record holds out its last.
    """
    if len(docs) < 2:
        raise JaxlmError(
            f"data.path: only {len(docs)} document(s); need at least 2 to hold out an eval split"
        )
    return SplitView(docs, eval_fraction, False), SplitView(docs, eval_fraction, True)


def check_enough_text(docs: Sequence[str], batch_size: int, seq_len: int) -> None:
    """Refuse a training split that cannot fill a single batch.

    A token covers at least one character, plus BOS/EOS per document, so this bound
    needs no tokenizer and fails before one is trained. The characters are bounded from
    file metadata (file sizes), so no document is read; a source without such a bound
    (ArrayRecord, whose records may be compressed) is not checked here.
    """
    chars = max_chars(docs)
    if chars is None:
        return
    most_tokens = chars + 2 * len(docs)
    if most_tokens < batch_size * seq_len:
        raise JaxlmError(
            f"data.path: the training split has at most {most_tokens} tokens, fewer than one "
            f"batch of {batch_size} x {seq_len}; add text or lower train.batch_size/train.seq_len"
        )


def _tokenize(tokenizer: spm.SentencePieceProcessor, text: str) -> dict[str, np.ndarray]:
    # The tokenizer's own ids: an imported HF tokenizer's differ from jaxlm's 2 and 3
    # (GPT-2 has one <|endoftext|> for both, so a missing BOS falls back to EOS).
    eos = tokenizer.eos_id()
    bos = tokenizer.bos_id() if tokenizer.bos_id() >= 0 else eos
    ids = np.asarray([bos, *tokenizer.encode(text), eos], dtype=np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}


def _rename(row: dict[str, np.ndarray]) -> Batch:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
    }


def owned_streams(num_streams: int, process_index: int, process_count: int) -> list[int]:
    """The streams a process reads: a contiguous block, so the global batch is in stream
    order whatever the number of processes."""
    num_streams = num_streams or process_count
    if num_streams % process_count:
        raise JaxlmError(
            f"config key 'data.streams': {num_streams} streams cannot be shared evenly by "
            f"{process_count} processes; use a multiple of the process count"
        )
    per = num_streams // process_count
    return list(range(process_index * per, (process_index + 1) * per))


def _stream(
    docs: Sequence[str],
    tokenizer: spm.SentencePieceProcessor,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    ds = grain.MapDataset.source(docs)[index::num_streams]  # lazy: reads by index
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(partial(_tokenize, tokenizer))
    packed = grain.experimental.ConcatThenSplitIterDataset(
        ds.to_iter_dataset(READ_OPTIONS),
        length_struct={"inputs": seq_len, "targets": seq_len},
    )
    return packed.map(_rename).batch(rows, drop_remainder=True)


def make_dataset(
    docs: Sequence[Any],
    tokenizer: spm.SentencePieceProcessor,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_streams: int = 0,
    make_stream: Callable[..., grain.IterDataset] | None = None,
) -> grain.IterDataset:
    """Batches of packed rows for this process: `batch_size` is the per-process size.

    The documents are dealt into `num_streams` streams (0 = one per process), each
    packed on its own; a process reads only the streams it owns and puts their rows
    side by side. With a fixed number of streams the global batch is the same for any
    process count, so a run can move between 1 and N hosts.

    `make_stream` builds one stream's batches (the signature of `_stream`, the causal-LM
    packing); the MLM and seq2seq pipelines bring their own and share the rest.
    """
    mine = owned_streams(num_streams, process_index, process_count)
    num_streams = num_streams or process_count
    if len(docs) < num_streams:
        raise JaxlmError(f"data.path: {len(docs)} documents cannot fill {num_streams} streams")
    if batch_size % len(mine):
        raise JaxlmError(
            f"config key 'data.streams': a process batch of {batch_size} rows cannot be "
            f"split over its {len(mine)} streams"
        )
    kw = dict(seq_len=seq_len, seed=seed, shuffle=shuffle, repeat=repeat)
    rows = batch_size // len(mine)
    make_stream = make_stream or _stream
    streams = [make_stream(docs, tokenizer, i, num_streams, rows=rows, **kw) for i in mine]
    return Streams(streams, mine, num_streams)


class Streams(grain.IterDataset):
    """Batches of this process's streams side by side (row-wise), in stream order."""

    def __init__(
        self, parents: Sequence[grain.IterDataset], indices: list[int], num_streams: int
    ) -> None:
        super().__init__(list(parents))
        self.indices, self.num_streams = indices, num_streams

    def __iter__(self) -> StreamsIterator:
        return StreamsIterator([iter(p) for p in self.parents], self.indices, self.num_streams)


class StreamsIterator(grain.DatasetIterator):
    """Its state is kept per stream (see data/checkpointing.py), not per process, so a
    checkpoint written by N processes resumes in M."""

    def __init__(
        self, parents: list[grain.DatasetIterator], indices: list[int], num_streams: int
    ) -> None:
        super().__init__(parents)
        self.indices, self.num_streams = indices, num_streams

    def __next__(self) -> Batch:
        parts = [next(p) for p in self._parents]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        pairs = zip(self.indices, self._parents, strict=True)
        return {"streams": {str(i): p.get_state() for i, p in pairs}}

    def set_state(self, state: dict) -> None:
        for i, p in zip(self.indices, self._parents, strict=True):
            p.set_state(state["streams"][str(i)])


def eval_batches(
    docs: Sequence[Any],
    tokenizer: spm.SentencePieceProcessor,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    num_streams: int = 0,
    make_stream: Callable[..., grain.IterDataset] | None = None,
) -> list[Batch]:
    """A fixed list of eval batches: the same every time, so losses are comparable."""
    ds = make_dataset(
        docs,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        repeat=False,
        process_index=process_index,
        process_count=process_count,
        num_streams=num_streams,
        make_stream=make_stream,
    )
    batches = []
    for batch in ds:
        batches.append(batch)
        if len(batches) == max_batches:
            break
    if not batches:
        raise JaxlmError(
            f"data: the eval split is too small for one batch of {batch_size} x {seq_len} "
            "tokens; lower train.batch_size/train.seq_len or raise data.eval_fraction"
        )
    return batches
