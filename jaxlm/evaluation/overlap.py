"""BLEU and ROUGE of predictions against references, by the field's own packages.

sacrebleu's corpus BLEU (its default 13a tokenizer, so figures compare with published
ones) and rouge-score's ROUGE-1/2/L F-measures averaged over examples (with the Porter
stemmer, as the summarisation literature reports them); all on a 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

from jaxlm.errors import JaxlmError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise JaxlmError(
            f"{len(predictions)} predictions but {len(references)} references; they pair up"
        )
    if not predictions:
        raise JaxlmError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        for name, score in scorer.score(ref, pred).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def overlap_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"bleu", "rouge1", "rouge2", "rougeL", "examples"}."""
    return {
        "bleu": bleu(predictions, references),
        **rouge(predictions, references),
        "examples": len(predictions),
    }
