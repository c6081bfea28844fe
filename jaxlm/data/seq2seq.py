"""Source -> target pairs for the encoder-decoder (T5) objective.

Pairs come from JSONL records (`data.source_field`, `data.target_field`). Source and
target are tokenized on their own and truncated to their lengths, each ending in EOS
(as T5's are); the decoder reads BOS + the target shifted right and predicts the
target. Rows are padded, not packed: the masks say which positions are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import grain
import numpy as np
import sentencepiece as spm

from jaxlm.data.pipeline import READ_OPTIONS
from jaxlm.data.sources import jsonl_file_records
from jaxlm.errors import JaxlmError

Pair = tuple[str, str]
Example = dict[str, np.ndarray]


def read_pairs(
    path: str,
    source_field: str = "src",
    target_field: str = "tgt",
    settings: tuple[str, str, str] = ("data.path", "data.source_field", "data.target_field"),
) -> list[Pair]:
    """All (source, target) pairs of the JSONL files at `path`, in file order.

    `settings` name what set `path` and the two fields, for the errors to point at:
    config keys in training, the flags (`--pairs`, `--source-field`...) in `jaxlm eval`.
    """
    path_setting, source_setting, target_setting = settings
    pairs: list[Pair] = []
    expected = (
        f"seq2seq data must be JSONL records with fields {source_field!r} and {target_field!r}"
    )
    for file, number, record in jsonl_file_records(path, expected):
        values = [
            record.get(f) if isinstance(record, dict) else None
            for f in (source_field, target_field)
        ]
        for field, value in zip((source_field, target_field), values, strict=True):
            if not isinstance(value, str):
                setting = source_setting if field == source_field else target_setting
                raise JaxlmError(
                    f"data file {file}, line {number}: no string field {field!r} (set {setting})"
                )
        if values[0].strip() and values[1].strip():
            pairs.append((values[0], values[1]))
    if not pairs:
        raise JaxlmError(f"{path_setting}: no source/target pairs at {path!r}")
    return pairs


def _pad(ids: list[int], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(length, pad, np.int32)
    out[: len(ids)] = ids
    return out, (np.arange(length) < len(ids)).astype(np.int32)


def encode_pair(
    pair: Pair, tokenizer: spm.SentencePieceProcessor, src_len: int, tgt_len: int
) -> Example:
    """One padded example: the source, and the target as decoder input and labels."""
    eos, bos, pad = tokenizer.eos_id(), tokenizer.bos_id(), tokenizer.pad_id()
    src = [*tokenizer.encode(pair[0])[: src_len - 1], eos]
    tgt = [*tokenizer.encode(pair[1])[: tgt_len - 1], eos]
    inputs, input_mask = _pad(src, src_len, pad)
    targets, target_mask = _pad(tgt, tgt_len, pad)
    decoder_inputs, _ = _pad([bos, *tgt[:-1]], tgt_len, pad)
    return {
        "inputs": inputs,
        "input_mask": input_mask,
        "decoder_inputs": decoder_inputs,
        "targets": targets,
        "target_mask": target_mask,
    }


def seq2seq_stream(
    pairs: Sequence[Pair],
    tokenizer: spm.SentencePieceProcessor,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    target_len: int = 0,
) -> grain.IterDataset:
    """One stream of seq2seq batches (the `make_stream` of data/pipeline.py): sources
    of `seq_len` tokens, targets of `target_len` (0 = seq_len)."""
    ds = grain.MapDataset.source(list(pairs))[index::num_streams]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(
        partial(encode_pair, tokenizer=tokenizer, src_len=seq_len, tgt_len=target_len or seq_len)
    )
    return ds.to_iter_dataset(READ_OPTIONS).batch(rows, drop_remainder=True)
