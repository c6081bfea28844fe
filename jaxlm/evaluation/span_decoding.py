"""Extractive QA's span decoding, as BERT's SQuAD evaluation does it: the answer is the
span of context tokens (start <= end, at most `max_answer_len` tokens) with the best
start logit + end logit, over every window of the question's context; its characters
come from the tokens' offsets. Positions outside the context ([CLS], question, [SEP],
padding) never start or end an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxlm.data.extractive_qa import NO_OFFSET, QaFeatures


@dataclass(frozen=True)
class Span:
    """The best span of one question: its row, token positions, score and characters."""

    row: int
    start: int
    end: int  # inclusive
    score: float
    char_start: int
    char_end: int  # exclusive


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    max_answer_len: int,
) -> Span | None:
    """The best span over rows (N, L) of one question; None when no row has context."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    context = offsets[..., 0] != NO_OFFSET  # (N, L)
    length = start_logits.shape[-1]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    band = (j >= i) & (j - i < max_answer_len)  # (L, L): start i, end j
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (N, L, L)
    valid = band[None] & context[:, :, None] & context[:, None, :]
    if not valid.any():
        return None
    scores = np.where(valid, scores, -np.inf)
    row, start, end = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return Span(
        int(row),
        int(start),
        int(end),
        float(scores[row, start, end]),
        int(offsets[row, start, 0]),
        int(offsets[row, end, 1]),
    )


def decode_answers(
    features: QaFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    contexts: Sequence[str],
    max_answer_len: int = 30,
) -> list[str]:
    """The answer text of each question (index into `contexts`), from its rows' logits."""
    answers = []
    for n, context in enumerate(contexts):
        rows = np.flatnonzero(features.example == n)
        span = best_span(
            start_logits[rows], end_logits[rows], features.offsets[rows], max_answer_len
        )
        answers.append("" if span is None else context[span.char_start : span.char_end])
    return answers
