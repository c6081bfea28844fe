"""BLEU, chrF and ROUGE of predictions against references, by the field's own packages.

sacrebleu's corpus BLEU and chrF (default settings: BLEU's 13a tokenizer, chrF's
character 6-grams with beta 2), reported with sacrebleu's signature so a figure says
how it was computed and compares with published ones; rouge-score's ROUGE-1/2/L
F-measures averaged over examples (with the Porter stemmer, as the summarisation
literature reports them; with several references an example takes its best, as
rouge-score's `score_multi`). All on a 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from jaxlm.errors import JaxlmError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise JaxlmError(
            f"{len(predictions)} predictions but {len(references)} references; they pair up"
        )
    if not predictions:
        raise JaxlmError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check(predictions, references)
    return float(BLEU().corpus_score(list(predictions), [list(references)]).score)


def bleu_chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """{"bleu", "chrf", "bleu_signature", "chrf_signature"}: corpus scores, one
    reference per prediction."""
    _check(predictions, references)
    refs = [list(references)]
    b, c = BLEU(), CHRF()
    return {
        "bleu": float(b.corpus_score(list(predictions), refs).score),
        "chrf": float(c.corpus_score(list(predictions), refs).score),
        "bleu_signature": str(b.get_signature()),
        "chrf_signature": str(c.get_signature()),
    }


def rouge(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures; a reference may be a list of references."""
    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        refs = [ref] if isinstance(ref, str) else list(ref)
        for name, score in scorer.score_multi(refs, pred).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def overlap_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"bleu", "rouge1", "rouge2", "rougeL", "examples"}."""
    return {
        "bleu": bleu(predictions, references),
        **rouge(predictions, references),
        "examples": len(predictions),
    }
