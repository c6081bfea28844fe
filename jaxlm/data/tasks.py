"""What each model family trains on: its examples, tokenizer corpus and batch streams.

A family names its task in `FAMILIES[...].data`: `packed` documents in rows
(data/pipeline.py), the same documents as `mlm_nsp` sentence pairs (data/mlm.py), or
`seq2seq` source -> target pairs (data/seq2seq.py). A `packed` (decoder) family trains
on `sft` examples instead when `data.format` says so, or, at `auto`, when the JSONL
records are prompt/completion pairs or conversations (data/sft.py). A `seq2seq` family
pretrains with T5's `span_corruption` (data/span_corruption.py) on plain text: at
`data.format=text`, or at `auto` when no data file is JSONL. BERT's QA head
(`model.head=qa`) trains on `extractive_qa` passages (data/extractive_qa.py). All share
`make_dataset`'s per-process streams, so sharding over hosts and the checkpointed data
position work the same for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import sentencepiece as spm

from jaxlm.config import Config
from jaxlm.data import extractive_qa, mlm, seq2seq, sft, span_corruption
from jaxlm.data.pipeline import check_enough_text, split_documents
from jaxlm.data.sources import list_files, read_documents
from jaxlm.errors import JaxlmError
from jaxlm.model_config import FAMILIES, family_of


def is_sft(config: Config) -> bool:
    """Whether a decoder trains on SFT examples: `data.format=sft`, or `auto` with a
    first JSONL record holding the messages field or the prompt and completion fields."""
    d = config.data
    if FAMILIES[config.model.family].data != "packed" or d.format == "text":
        return False
    if d.format == "sft":
        return True
    return sft.looks_like_sft(d.path, d.messages_field, d.prompt_field, d.completion_field)


def is_plain_text(config: Config) -> bool:
    """Whether the data is documents rather than records of fields: `data.format=text`,
    or `auto` with no JSONL file among the data files."""
    d = config.data
    if d.format != "auto":
        return d.format == "text"
    return not any(f.suffix in (".jsonl", ".json") for f in list_files(d.path))


def _task(config: Config) -> str:
    if is_sft(config):
        return "sft"
    task = family_of(config.model).data  # BERT's QA head: extractive_qa
    if task == "seq2seq" and is_plain_text(config):
        return "span_corruption"
    return task


def _chunk_length(config: Config) -> int:
    d = config.data
    return span_corruption.chunk_length(
        config.train.seq_len, d.target_len, d.noise_density, d.mean_noise_span_length
    )


def _sentinel_count(config: Config) -> int:
    """The most noise spans a chunk has: the sentinels span corruption needs."""
    d = config.data
    length = _chunk_length(config)
    return span_corruption.span_counts(length, d.noise_density, d.mean_noise_span_length)[1]


def read_examples(config: Config) -> Sequence[Any]:
    """Documents (str, a lazy source: data/sources.py), or (source, target) pairs and
    SFT records (in memory)."""
    d = config.data
    if _task(config) == "seq2seq":
        return seq2seq.read_pairs(d.path, d.source_field, d.target_field)
    if _task(config) == "sft":
        return sft.read_records(d.path, d)
    if _task(config) == "extractive_qa":
        return extractive_qa.read_passages(d.path)
    return read_documents(d.path, d.text_field, d.split)


def train_and_held_out(config: Config) -> tuple[Sequence[Any], Sequence[Any]]:
    """The training examples and the held-out ones: all of `data.path` and all of
    `data.eval_path` when that is set, else `data.path` split by `data.eval_fraction`
    (one record in every 1/f, `pipeline.split_documents`)."""
    examples = read_examples(config)
    eval_path = config.data.eval_path
    if not eval_path:
        return split_documents(examples, config.data.eval_fraction)
    try:
        held_out = read_examples(config.replace(data={"path": eval_path}))
    except JaxlmError as err:  # the reader names data.path, whose value it was given
        raise JaxlmError(str(err).replace("data.path:", "data.eval_path:", 1)) from None
    if not len(held_out):
        raise JaxlmError(f"data.eval_path: {eval_path} holds no examples")
    return examples, held_out


def check_enough(config: Config, train_examples: Sequence[Any]) -> None:
    """Refuse a training split that cannot fill one batch, before a tokenizer is trained."""
    t = config.train
    if _task(config) in ("sft", "extractive_qa"):  # rows of whole examples, repeated
        return
    if _task(config) == "seq2seq":
        if len(train_examples) < t.batch_size:
            raise JaxlmError(
                f"data.path: the training split has {len(train_examples)} pairs, fewer than "
                f"one batch of {t.batch_size}; add data or lower train.batch_size"
            )
        return
    if _task(config) == "span_corruption":  # no chunk fits: an error naming the keys
        _chunk_length(config)
    check_enough_text(train_examples, t.batch_size, t.seq_len)


def sample_examples(config: Config, examples: Sequence[Any]) -> list[Any]:
    """A seeded random sample of `examples` (all of them, in order, when few enough):
    at most `tokenizer.sample_docs`, stopping once `tokenizer.sample_bytes` are read
    (documents' characters), so a tokenizer never reads the corpus."""
    tok = config.tokenizer
    n = len(examples)
    if n <= tok.sample_docs:
        order: Sequence[int] = range(n)
    else:  # random order, so the byte cap keeps a random subset
        rng = np.random.default_rng(config.seed)
        order = rng.choice(n, tok.sample_docs, replace=False).tolist()
    sample, size = [], 0
    for i in order:
        example = examples[i]
        sample.append(example)
        size += len(example) if isinstance(example, str) else 0
        if size >= tok.sample_bytes:
            break
    return sample


def tokenizer_corpus(config: Config, train_examples: Sequence[Any]) -> list[str]:
    """The text a tokenizer is trained on: a sample of the training examples (see
    `sample_examples`), both sides of seq2seq pairs."""
    train_examples = sample_examples(config, train_examples)
    if _task(config) == "seq2seq":
        return [text for pair in train_examples for text in pair]
    if _task(config) == "sft":
        return sft.corpus(train_examples)
    if _task(config) == "extractive_qa":
        return extractive_qa.passage_text(train_examples)
    return list(train_examples)


def tokenizer_symbols(config: Config) -> tuple[str, ...]:
    """Pieces the task needs beyond PAD/UNK/BOS/EOS: BERT's mask, or as many T5
    sentinels as a chunk can have spans."""
    if _task(config) == "mlm_nsp":
        return (mlm.MASK_PIECE,)
    if _task(config) == "span_corruption":
        return span_corruption.sentinel_pieces(_sentinel_count(config))
    return ()


def _describe_span_corruption(config: Config, seq_len: int) -> str:
    d = config.data
    length = span_corruption.chunk_length(
        seq_len, d.target_len, d.noise_density, d.mean_noise_span_length
    )
    inputs, targets = span_corruption.corrupted_lengths(
        length, d.noise_density, d.mean_noise_span_length
    )
    noise, spans = span_corruption.span_counts(length, d.noise_density, d.mean_noise_span_length)
    return (
        f"span corruption: chunks of {length} tokens, {noise} hidden in {spans} spans -> "
        f"{inputs} of {seq_len} encoder tokens, {targets} of {d.target_len or seq_len} "
        "decoder tokens (data.target_len)"
    )


def stream_maker(config: Config, tokenizer: spm.SentencePieceProcessor) -> Callable | None:
    """`make_dataset`'s `make_stream` for the task (None: causal-LM packing)."""
    if _task(config) == "mlm_nsp":
        mlm.mask_id(tokenizer)  # a tokenizer without a mask piece fails here, readably
        return mlm.mlm_stream
    if _task(config) == "seq2seq":
        return partial(seq2seq.seq2seq_stream, target_len=config.data.target_len)
    if _task(config) == "span_corruption":
        d = config.data
        # A tokenizer without the sentinels fails here, readably.
        span_corruption.sentinel_ids(tokenizer, _sentinel_count(config))
        return partial(
            span_corruption.span_corruption_stream,
            target_len=d.target_len,
            noise_density=d.noise_density,
            mean_noise_span_length=d.mean_noise_span_length,
        )
    if _task(config) == "sft":
        return sft.sft_stream
    if _task(config) == "extractive_qa":
        return extractive_qa.qa_stream
    return None


def encode_splits(
    config: Config,
    tokenizer: spm.SentencePieceProcessor,
    splits: Sequence[Sequence[Any]],
    seq_len: int = 0,
    log: bool = True,
) -> list[Sequence[Any]]:
    """The splits as the streams take them: SFT examples rendered, tokenized and
    truncated up front (so a template that fails to render fails before any compile;
    the truncation count is printed when `log`); other tasks' examples as they are
    (span corruption prints its chunk and corrupted lengths when `log`)."""
    if log and _task(config) == "span_corruption":
        print(_describe_span_corruption(config, seq_len or config.train.seq_len))
    if _task(config) == "extractive_qa":  # passages -> rows of windows, up front
        n = seq_len or config.train.seq_len
        stride = config.data.doc_stride or n // 2
        return [extractive_qa.training_rows(s, tokenizer, n, stride) for s in splits]
    if not any(isinstance(example, sft.Record) for split in splits for example in split[:1]):
        return list(splits)
    seq_len = seq_len or config.train.seq_len
    out, reports = [], []
    for examples in splits:
        rows, report = sft.encode_records(examples, tokenizer, config.data, seq_len)
        out.append(rows)
        reports.append(report)
    if not out[0]:
        raise JaxlmError(
            f"data: every training example lost its trained tokens to truncation at "
            f"train.seq_len={seq_len}; raise train.seq_len or set data.truncation_side=left"
        )
    if log:
        print(sft.describe(reports[0], sum(reports[1:], sft.Report()), config.data, seq_len))
    return out
