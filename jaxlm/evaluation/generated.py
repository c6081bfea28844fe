"""Text generated for scoring: greedy outputs of each source, in batches.

Generation goes through `jaxlm.pipeline`'s TextGenerationPipeline, the code users call,
so a score is of the text they get: the same prompt encoding (BOS + prompt for a
decoder; source + EOS for T5, whose decoder starts from BOS), the same decoding of the
output (without the prompt, EOS and pad), and long prompts cut as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm


def generate_texts(
    pretrained: Any,
    sources: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """One greedy output per source, without the prompt and without EOS."""
    from jaxlm.pipeline import TextGenerationPipeline

    pipe = TextGenerationPipeline.from_loaded(pretrained)
    keywords: dict[str, Any] = {"max_new_tokens": max_new_tokens, "truncation": True}
    if not pipe.encoder_decoder:
        keywords["return_full_text"] = False
    outputs: list[str] = []
    starts = range(0, len(sources), batch_size)
    # disable=None: a bar on a terminal, nothing in logs
    for start in tqdm(starts, "generating", disable=None, leave=False):
        chunk = list(sources[start : start + batch_size])
        outputs += [rows[0]["generated_text"] for rows in pipe(chunk, **keywords)]
    return outputs
