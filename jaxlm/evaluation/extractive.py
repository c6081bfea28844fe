"""Answers of an extractive QA model (BERT with `model.head=qa`) for `jaxlm eval --task
qa`: each question and its passage become windows (data/extractive_qa.py), the model
scores every token as the answer's start and end, and the best span over the windows
(evaluation/span_decoding.py) is the answer text, scored by the same EM/F1 as generated
answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxlm.data.extractive_qa import qa_features
from jaxlm.errors import JaxlmError
from jaxlm.evaluation.span_decoding import decode_answers
from jaxlm.model_config import family_of

MAX_ANSWER_LEN = 30  # tokens, as BERT's SQuAD evaluation


def extractive_answers(
    loaded: Any,
    records: Sequence[dict],
    examples: Sequence[Any],
    batch_size: int = 8,
    seq_len: int = 0,
) -> list[str]:
    """The answer text of each example (a question of `records`, by id); rows of
    `seq_len` tokens (0 = the model's training length), windows half a row apart."""
    m = loaded.config.model.resolved()
    if family_of(m).objective != "extractive_qa":
        raise JaxlmError(
            f"model.head {m.head!r}: a {m.family} answers extractive QA only with "
            "model.head=qa (start/end logits, as BertForQuestionAnswering)"
        )
    by_id = {
        qa["id"]: (qa["question"], record["context"]) for record in records for qa in record["qas"]
    }
    questions, contexts = zip(*(by_id[e.id] for e in examples), strict=True)
    seq_len = min(seq_len or loaded.config.train.seq_len, loaded.config.model.max_len)
    features = qa_features(loaded.tokenizer, questions, contexts, seq_len, seq_len // 2)
    apply = jax.jit(loaded.model.apply)
    starts, ends = [], []
    for first in range(0, len(features), batch_size):
        rows = slice(first, first + batch_size)
        arrays = [features.tokens[rows], features.token_types[rows], features.mask[rows]]
        real = len(arrays[0])
        padded = [np.pad(a, ((0, batch_size - real), (0, 0))) for a in arrays]  # one shape
        start, end = apply({"params": loaded.params}, *padded)
        starts.append(np.asarray(start)[:real])
        ends.append(np.asarray(end)[:real])
    return decode_answers(
        features, np.concatenate(starts), np.concatenate(ends), contexts, MAX_ANSWER_LEN
    )
