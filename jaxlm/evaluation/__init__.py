"""Measuring a model: perplexity and bits per byte on text, masked-token and NSP
accuracy for BERT, BLEU, chrF and ROUGE of generated text, SQuAD exact match and F1, and
the tasks that use them (tasks.py). `jaxlm eval` prints them."""

from jaxlm.evaluation.generated import generate_texts
from jaxlm.evaluation.model_eval import evaluate_model
from jaxlm.evaluation.overlap import bleu, bleu_chrf, overlap_scores, rouge
from jaxlm.evaluation.report import format_table, write_json
from jaxlm.evaluation.squad import squad_scores

__all__ = [
    "bleu",
    "bleu_chrf",
    "evaluate_model",
    "format_table",
    "generate_texts",
    "overlap_scores",
    "rouge",
    "squad_scores",
    "write_json",
]
