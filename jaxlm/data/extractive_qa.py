"""Extractive QA features, as BERT is fine-tuned on SQuAD: each question and its passage
become rows `[CLS] question [SEP] context-window [SEP]` (token types 0 then 1), one
row per window of the context when it is longer than a row holds. Windows start
`stride` context tokens apart (BERT's `doc_stride`), so an answer cut by one window's
edge lies whole in the next. Each row keeps its context tokens' character spans
(`offsets`) so a predicted token span maps back to text, and, for training, the
answer's first and last token positions, or 0 ([CLS], "no answer here") for a window
that does not hold the whole answer.

Tokens come with their character spans: a Hugging Face `tokenizer.json` tokenizer
(BERT's WordPiece) gives them (`encode_with_offsets`), and so does sentencepiece
(`piece_offsets`), so a BERT pretrained by `jaxlm train` with its own tokenizer
fine-tunes on QA too. A span leaves out its
piece's leading whitespace (sentencepiece's `▁`), as WordPiece's do, so answers
have no stray space.

For `jaxlm train` (model.head=qa) the data is SQuAD-layout JSONL (`read_passages`,
one passage with its questions a line, checked by the qa task's reader), the splits
become training rows up front (`training_rows`) and `qa_stream` deals them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from jaxlm.errors import JaxlmError

NO_OFFSET = -1  # offsets of a row's non-context tokens ([CLS], question, [SEP], padding)


@dataclass(frozen=True)
class QaFeatures:
    """The windows of several questions, stacked as (rows, seq_len) arrays."""

    tokens: np.ndarray  # (N, L) int32
    token_types: np.ndarray  # (N, L) int32: 0 question, 1 context
    mask: np.ndarray  # (N, L) int32: 1 on real tokens, 0 on padding
    offsets: np.ndarray  # (N, L, 2) int32: a context token's [start, end) in characters
    start_positions: np.ndarray  # (N,) int32: the answer's first token; 0 when not here
    end_positions: np.ndarray  # (N,) int32: its last token (inclusive); 0 when not here
    example: np.ndarray  # (N,) int32: the question each row belongs to

    def __len__(self) -> int:
        return len(self.example)


def piece_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and [start, end) character spans of a sentencepiece encoding of `text`.

    sentencepiece gives character spans as `offset_mapping` (0.2.3 on) or in an
    `immutable_proto` (before; 0.2.3 refuses it, and its `proto` counts UTF-8 bytes).
    The byte pieces byte fallback splits a character into are empty spans at its
    start but the last, which covers it."""
    try:
        out = tokenizer.encode(text, out_type="offset_mapping")
        return list(out["ids"]), [(int(a), int(b)) for a, b in out["offsets"]]
    except (RuntimeError, ValueError):  # sentencepiece < 0.2.3: unknown out_type
        proto = tokenizer.encode(text, out_type="immutable_proto")
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of `text`, each span without its leading whitespace."""
    if hasattr(tokenizer, "encode_with_offsets"):  # a tokenizer.json tokenizer
        ids, spans = tokenizer.encode_with_offsets(text)
    else:
        ids, spans = piece_offsets(tokenizer, text)
    trimmed = []
    for start, end in spans:
        while start < end and text[start].isspace():
            start += 1
        trimmed.append((start, end))
    return list(ids), trimmed


def _answer_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """First and last context token overlapping characters [start, end)."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not inside:
        raise JaxlmError(f"the answer at characters {start}:{end} covers no context token")
    return inside[0], inside[-1]


def _specials(tokenizer: Any) -> tuple[int, int, int]:
    """(CLS, SEP, PAD); a tokenizer without CLS/SEP uses BOS/EOS, as BERT's MLM does."""
    cls = tokenizer.cls_id() if hasattr(tokenizer, "cls_id") else -1
    sep = tokenizer.sep_id() if hasattr(tokenizer, "sep_id") else -1
    cls, sep = (cls, sep) if cls >= 0 and sep >= 0 else (tokenizer.bos_id(), tokenizer.eos_id())
    if cls < 0 or sep < 0:
        raise JaxlmError("extractive QA needs a tokenizer with [CLS]/[SEP] (or BOS/EOS) tokens")
    return cls, sep, max(tokenizer.pad_id(), 0)


def qa_features(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    seq_len: int,
    stride: int,
    answers: Sequence[tuple[int, str] | None] | None = None,
    max_question_len: int = 64,
) -> QaFeatures:
    """Rows for each (question, context); `answers` (character start, text) per question
    (None for none) gives the rows' answer positions. Questions longer than
    `max_question_len` tokens, or half a row, are cut; `stride` is the step between
    windows' starts."""
    max_question_len = min(max_question_len, seq_len // 2)
    cls, sep, pad = _specials(tokenizer)
    rows: list[tuple[list[int], int, list[tuple[int, int]], int, int, int]] = []
    for n, (question, context) in enumerate(zip(questions, contexts, strict=True)):
        q_ids = tokenizer.encode(question)[:max_question_len]
        c_ids, c_offsets = encode_with_offsets(tokenizer, context)
        room = seq_len - len(q_ids) - 3
        if room < 1:
            raise JaxlmError(
                f"seq_len {seq_len} leaves no room for the context after a "
                f"{len(q_ids)}-token question"
            )
        span = None
        if answers is not None and answers[n] is not None:
            char_start, text = answers[n]
            span = _answer_tokens(c_offsets, char_start, char_start + len(text))
        first = 0
        while True:
            last = min(first + room, len(c_ids))
            ids = [cls, *q_ids, sep, *c_ids[first:last], sep]
            head = len(q_ids) + 2  # the row position of the window's first context token
            start = end = 0
            if span is not None and first <= span[0] and span[1] < last:
                start, end = head + span[0] - first, head + span[1] - first
            rows.append((ids, head, c_offsets[first:last], start, end, n))
            if last >= len(c_ids):
                break
            first += min(stride, room)
    return _stack(rows, seq_len, pad)


def _stack(rows: list, seq_len: int, pad: int) -> QaFeatures:
    n = len(rows)
    tokens = np.full((n, seq_len), pad, np.int32)
    types, mask = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32)
    offsets = np.full((n, seq_len, 2), NO_OFFSET, np.int32)
    for r, (ids, head, spans, _, _, _) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        mask[r, : len(ids)] = 1
        types[r, head : len(ids)] = 1
        if spans:
            offsets[r, head : head + len(spans)] = spans
    return QaFeatures(
        tokens,
        types,
        mask,
        offsets,
        np.array([row[3] for row in rows], np.int32),
        np.array([row[4] for row in rows], np.int32),
        np.array([row[5] for row in rows], np.int32),
    )


def read_passages(path: str) -> list[dict]:
    """The SQuAD-layout records (one passage and its questions a line) of the JSONL
    files at `path`, each checked by `jaxlm eval --task qa`'s reader: a missing field
    or an answer not at its `answer_start` is one error naming file and line."""
    from jaxlm.data.sources import jsonl_file_records
    from jaxlm.evaluation.tasks import get_task

    read = get_task("qa").read
    expected = "extractive QA data must be JSONL records {id, context, qas: [...]}"
    records = []
    for file, number, record in jsonl_file_records(path, expected):
        if not isinstance(record, dict):
            raise JaxlmError(f"data file {file}, line {number}: not a JSON object")
        read(record, f"data file {file}, line {number}")
        records.append(record)
    if not records:
        raise JaxlmError(f"data.path: no extractive QA records at {path!r}")
    return records


def passage_text(records: Sequence[dict]) -> list[str]:
    """Every passage and question: the text a tokenizer for this data is trained on."""
    return [t for r in records for t in (r["context"], *(q["question"] for q in r["qas"]))]


Row = dict[str, np.ndarray]


def training_rows(
    records: Sequence[dict], tokenizer: Any, seq_len: int, stride: int
) -> list[list[Row]]:
    """Each passage's training rows (one per question and window), as the objective
    reads them: `segment_ids` is 1 on real tokens. A question trains on its first
    answer, as SQuAD's training split has one."""
    out = []
    for record in records:
        qas = record["qas"]
        answers = [(q["answers"]["answer_start"][0], q["answers"]["text"][0]) for q in qas]
        f = qa_features(
            tokenizer,
            [q["question"] for q in qas],
            [record["context"]] * len(qas),
            seq_len,
            stride,
            answers,
        )
        out.append(
            [
                {
                    "inputs": f.tokens[r],
                    "token_types": f.token_types[r],
                    "segment_ids": f.mask[r],
                    "start_positions": f.start_positions[r],
                    "end_positions": f.end_positions[r],
                }
                for r in range(len(f))
            ]
        )
    return out


def qa_stream(
    passages: Sequence[list[Row]],
    tokenizer: Any,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """One stream of QA batches (the `make_stream` of data/pipeline.py): the stream's
    passages are dealt by passage, so a passage's windows stay in one stream, then its
    rows are shuffled one by one."""
    from jaxlm.data.pipeline import READ_OPTIONS

    mine = [row for passage in passages[index::num_streams] for row in passage]
    ds = grain.MapDataset.source(mine)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    return ds.to_iter_dataset(READ_OPTIONS).batch(rows, drop_remainder=True)
