"""Extractive QA features, as BERT is fine-tuned on SQuAD: each question and its passage
become rows `[CLS] question [SEP] context-window [SEP]` (token types 0 then 1), one
row per window of the context when it is longer than a row holds. Windows start
`stride` context tokens apart (BERT's `doc_stride`), so an answer cut by one window's
edge lies whole in the next. Each row keeps its context tokens' character spans
(`offsets`) so a predicted token span maps back to text, and, for training, the
answer's first and last token positions, or 0 ([CLS], "no answer here") for a window
that does not hold the whole answer.

Tokens come from the tokenizer's own character offsets (`encode_with_offsets`, a
Hugging Face `tokenizer.json` tokenizer such as BERT's WordPiece).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    `max_question_len` tokens are cut; `stride` is the step between windows' starts."""
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise JaxlmError("extractive QA needs a tokenizer.json tokenizer (character offsets)")
    cls, sep, pad = _specials(tokenizer)
    rows: list[tuple[list[int], int, list[tuple[int, int]], int, int, int]] = []
    for n, (question, context) in enumerate(zip(questions, contexts, strict=True)):
        q_ids = tokenizer.encode(question)[:max_question_len]
        c_ids, c_offsets = tokenizer.encode_with_offsets(context)
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
