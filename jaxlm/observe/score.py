"""`jaxlm score`: what a model thinks of a text, token by token.

A decoder gives each token its log-probability and rank (1 = the model's first
choice) given the tokens before it, and the text's perplexity; BERT gives its top-k
guesses, with probabilities, at each mask piece (`<mask>`, or `[MASK]` in BERT's own
vocabularies). One forward pass of the whole text: what training's loss measures.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxlm.errors import JaxlmError
from jaxlm.model_config import FAMILIES


def decoder_scores(pretrained: Any, text: str) -> dict[str, Any]:
    """{"tokens": [{"token", "id", "logprob", "rank"}], "perplexity"} of `text` after BOS."""
    model, params, tokenizer, config = pretrained
    ids = [tokenizer.bos_id(), *tokenizer.encode(text)]
    if len(ids) < 2:
        raise JaxlmError("score: the text is empty")
    if len(ids) > config.model.max_len:
        raise JaxlmError(
            f"score: {len(ids)} tokens exceed the model's max_len {config.model.max_len}"
        )
    logits = jax.jit(model.apply)({"params": params}, np.asarray([ids], np.int32))[0]
    logprobs = np.asarray(jax.nn.log_softmax(logits[:-1].astype(np.float32), axis=-1))
    targets = np.asarray(ids[1:])
    chosen = logprobs[np.arange(len(targets)), targets]
    ranks = 1 + (logprobs > chosen[:, None]).sum(-1)
    tokens = [
        {"token": tokenizer.id_to_piece(int(t)), "id": int(t), "logprob": float(lp), "rank": int(r)}
        for t, lp, r in zip(targets, chosen, ranks, strict=True)
    ]
    return {"tokens": tokens, "perplexity": math.exp(-float(chosen.mean()))}


def mask_predictions(pretrained: Any, text: str, top_k: int = 5) -> dict[str, Any]:
    """{"masks": [{"position", "predictions": [{"token", "id", "prob"}]}]}: BERT's top-k
    at each mask piece of `text`, read as [CLS] text [SEP]."""
    from jaxlm.data.mlm import MASK_PIECES, mask_id

    model, params, tokenizer, config = pretrained
    mask = mask_id(tokenizer)
    piece = next(p for p in MASK_PIECES if tokenizer.piece_to_id(p) == mask)
    ids = [tokenizer.bos_id()]
    for i, part in enumerate(text.split(piece)):  # the mask stands for a word and its space
        ids += ([mask] if i else []) + (tokenizer.encode(part.rstrip()) if part.strip() else [])
    ids.append(tokenizer.eos_id())
    positions = [i for i, t in enumerate(ids) if t == mask]
    if not positions:
        raise JaxlmError(f"score: a BERT model predicts masked tokens; the text has no {piece}")
    if len(ids) > config.model.max_len:
        raise JaxlmError(
            f"score: {len(ids)} tokens exceed the model's max_len {config.model.max_len}"
        )
    logits = jax.jit(model.apply)({"params": params}, np.asarray([ids], np.int32))[0][0]
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    masks = []
    for pos in positions:
        best = np.argsort(-probs[pos], kind="stable")[:top_k]
        predictions = [
            {"token": tokenizer.id_to_piece(int(t)), "id": int(t), "prob": float(probs[pos, t])}
            for t in best
        ]
        masks.append({"position": pos, "predictions": predictions})
    return {"masks": masks}


def score(pretrained: Any, text: str, top_k: int = 5) -> dict[str, Any]:
    """Per-token scores (decoders) or mask predictions (BERT) of `text`."""
    kind = FAMILIES[pretrained.config.model.family].kind
    if kind == "decoder":
        return decoder_scores(pretrained, text)
    if kind == "encoder":
        return mask_predictions(pretrained, text, top_k)
    raise JaxlmError(f"score: {pretrained.config.model.family} models are not supported")


def format_scores(result: dict[str, Any]) -> str:
    """A table for the terminal: one token a line."""
    if "masks" in result:
        lines = []
        for m in result["masks"]:
            guesses = ", ".join(f"{p['token']!r} {p['prob']:.3f}" for p in m["predictions"])
            lines.append(f"mask at {m['position']}: {guesses}")
        return "\n".join(lines)
    lines = [f"{'token':<20} {'logprob':>9} {'rank':>6}"]
    lines += [f"{t['token']!r:<20} {t['logprob']:>9.3f} {t['rank']:>6}" for t in result["tokens"]]
    lines.append(f"perplexity {result['perplexity']:.2f} over {len(result['tokens'])} tokens")
    return "\n".join(lines)
