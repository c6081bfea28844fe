"""What each model family trains on: its examples, tokenizer corpus and batch streams.

A family names its task in `FAMILIES[...].data`: `packed` documents in rows
(data/pipeline.py), the same documents as `mlm_nsp` sentence pairs (data/mlm.py), or
`seq2seq` source -> target pairs (data/seq2seq.py). All three share `make_dataset`'s
per-process streams, so sharding over hosts and the checkpointed data position work
the same for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import sentencepiece as spm

from jaxlm.config import Config
from jaxlm.data import mlm, seq2seq
from jaxlm.data.pipeline import check_enough_text
from jaxlm.data.sources import read_documents
from jaxlm.errors import JaxlmError
from jaxlm.model_config import FAMILIES


def _task(config: Config) -> str:
    return FAMILIES[config.model.family].data


def read_examples(config: Config) -> list[Any]:
    """Documents (str), or (source, target) pairs."""
    d = config.data
    if _task(config) == "seq2seq":
        return seq2seq.read_pairs(d.path, d.source_field, d.target_field)
    return read_documents(d.path, d.text_field, d.split)


def check_enough(config: Config, train_examples: Sequence[Any]) -> None:
    """Refuse a training split that cannot fill one batch, before a tokenizer is trained."""
    t = config.train
    if _task(config) == "seq2seq":
        if len(train_examples) < t.batch_size:
            raise JaxlmError(
                f"data.path: the training split has {len(train_examples)} pairs, fewer than "
                f"one batch of {t.batch_size}; add data or lower train.batch_size"
            )
        return
    check_enough_text(train_examples, t.batch_size, t.seq_len)


def tokenizer_corpus(config: Config, train_examples: Sequence[Any]) -> list[str]:
    """The text a tokenizer is trained on: both sides of seq2seq pairs."""
    if _task(config) == "seq2seq":
        return [text for pair in train_examples for text in pair]
    return list(train_examples)


def tokenizer_symbols(config: Config) -> tuple[str, ...]:
    """Pieces the family needs beyond PAD/UNK/BOS/EOS."""
    return (mlm.MASK_PIECE,) if _task(config) == "mlm_nsp" else ()


def stream_maker(config: Config, tokenizer: spm.SentencePieceProcessor) -> Callable | None:
    """`make_dataset`'s `make_stream` for the task (None: causal-LM packing)."""
    if _task(config) == "mlm_nsp":
        mlm.mask_id(tokenizer)  # a tokenizer without a mask piece fails here, readably
        return mlm.mlm_stream
    if _task(config) == "seq2seq":
        return partial(seq2seq.seq2seq_stream, target_len=config.data.target_len)
    return None
