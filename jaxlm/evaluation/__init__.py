"""Measuring a model: perplexity and bits per byte on text, masked-token and NSP
accuracy for BERT, BLEU and ROUGE of generated text. `jaxlm eval` prints them."""

from jaxlm.evaluation.generated import generate_texts
from jaxlm.evaluation.model_eval import evaluate_model
from jaxlm.evaluation.overlap import bleu, overlap_scores, rouge
from jaxlm.evaluation.report import format_table, write_json

__all__ = [
    "bleu",
    "evaluate_model",
    "format_table",
    "generate_texts",
    "overlap_scores",
    "rouge",
    "write_json",
]
