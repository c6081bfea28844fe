"""Exact match and F1 of extractive answers, as SQuAD v1.1's official script
(`evaluate-v1.1.py`) computes them: answers are normalised (lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed), F1 is over the bag of
normalised tokens, and each prediction takes the best score over its gold answers, so
figures compare with published SQuAD/XQuAD ones. Both are on a 0-100 scale.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from jaxlm.errors import JaxlmError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, in its order: lower, drop punctuation, drop articles,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-bag F1 of the normalised texts (0 when either is empty and they differ)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}: means over examples of the best score over each
    example's gold answers."""
    if len(predictions) != len(golds):
        raise JaxlmError(f"{len(predictions)} predictions but {len(golds)} gold answer lists")
    if not predictions:
        raise JaxlmError("no predictions to score")
    em = [max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    fs = [max(f1(p, g) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(fs) / len(fs)}
