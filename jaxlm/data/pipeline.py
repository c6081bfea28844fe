"""The grain pipeline: documents -> tokens -> packed rows -> batches.

Each document becomes `[BOS] tokens [EOS]`, shifted into inputs and targets *before*
packing, so no target is ever the first token of the next document. Rows carry
segment ids (0 = padding) and per-document positions, which the model turns into a
block-diagonal causal mask. The iterator is a grain `DatasetIterator`, whose state
goes into every checkpoint so a resumed run sees exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import grain
import numpy as np
import sentencepiece as spm

from jaxlm.data.tokenizer import BOS_ID, EOS_ID
from jaxlm.errors import JaxlmError

Batch = dict[str, np.ndarray]


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last documents (a contiguous tail, like nanoGPT's val split)."""
    n_eval = max(1, round(len(docs) * eval_fraction))
    if len(docs) - n_eval < 1:
        raise JaxlmError(
            f"data.path: only {len(docs)} document(s); need at least 2 to hold out an eval split"
        )
    return list(docs[:-n_eval]), list(docs[-n_eval:])


def _tokenize(tokenizer: spm.SentencePieceProcessor, text: str) -> dict[str, np.ndarray]:
    ids = np.asarray([BOS_ID, *tokenizer.encode(text), EOS_ID], dtype=np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}


def _rename(row: dict[str, np.ndarray]) -> Batch:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
    }


def make_dataset(
    docs: Sequence[str],
    tokenizer: spm.SentencePieceProcessor,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of packed rows for this process: `batch_size` is the per-process size."""
    if len(docs) < process_count:
        raise JaxlmError(
            f"data.path: {len(docs)} documents cannot be shared by {process_count} processes"
        )
    ds = grain.MapDataset.source(list(docs))[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(partial(_tokenize, tokenizer))
    packed = grain.experimental.ConcatThenSplitIterDataset(
        ds.to_iter_dataset(),
        length_struct={"inputs": seq_len, "targets": seq_len},
    )
    return packed.map(_rename).batch(batch_size, drop_remainder=True)


def eval_batches(
    docs: Sequence[str],
    tokenizer: spm.SentencePieceProcessor,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
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
