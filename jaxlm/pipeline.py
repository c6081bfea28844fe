"""`jaxlm.pipeline(task, model=PATH)`: text in, text out, in the manner of Hugging Face.

    generate = jaxlm.pipeline("text-generation", model="runs/shakespeare")
    generate("The world is a beautiful place.", max_new_tokens=20)
    # [{"generated_text": "The world is a beautiful place. ..."}]

A string gives a list of `num_return_sequences` dicts, a list of strings a list of such
lists, as Hugging Face's pipelines do, and the generation keywords are Hugging Face's:
`max_new_tokens`, `do_sample` (greedy when False, the default), `temperature`,
`top_k` (50 when sampling, as Hugging Face), `top_p`, `num_return_sequences`,
`return_full_text` (text-generation only), `truncation` (False: a prompt too long for
the model is an error), plus `seed` and `stop_strings`.
"text2text-generation" runs encoder-decoder (T5) models.

Prompts are encoded by the model's tokenizer. With jaxlm's own sentencepiece tokenizers
they follow training: BOS before a decoder's prompt, EOS after a T5 source and BOS to
start its decoder; other tokenizers decide for themselves, as their `encode` does, and
T5's decoder starts from pad, as Hugging Face's. The text ends after a
stop string, which is kept, as Hugging Face keeps it. With `truncation=True` a long
prompt is cut as in training: a T5 source keeps its first `train.seq_len` tokens, a
decoder's prompt its last ones, leaving room for `max_new_tokens` within `max_len`.
`jaxlm eval --task` generates through this class, so scores are of the outputs users get.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from jaxlm.errors import JaxlmError

TASKS = ("text-generation", "text2text-generation")
KEYWORDS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_return_sequences",
    "return_full_text",
    "seed",
    "stop_strings",
    "truncation",
)
DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=50,
    do_sample=False,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    num_return_sequences=1,
    return_full_text=True,
    seed=0,
    stop_strings=(),
    truncation=False,
)


def _is_sentencepiece(tokenizer: Any) -> bool:
    import sentencepiece as spm

    return isinstance(tokenizer, spm.SentencePieceProcessor)


def _check_keywords(task: str, kwargs: dict[str, Any]) -> None:
    allowed = [k for k in KEYWORDS if not (task != "text-generation" and k == "return_full_text")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise JaxlmError(f"{task}: unknown keyword {unknown[0]!r}; known: {', '.join(allowed)}")


def _on_one_device(params: Any) -> Any:
    """Replicated params (a data-parallel mesh) move to one device: a generation call
    gains nothing from running the same rows on every device."""
    leaves = jax.tree_util.tree_leaves(params)
    if all(getattr(x, "sharding", None) is None or x.sharding.is_fully_replicated for x in leaves):
        return jax.device_put(params, jax.devices()[0])
    return params


@dataclass
class TextGenerationPipeline:
    """A loaded model and its tokenizer; call it with text. See the module doc."""

    task: str
    model: Any
    params: Any
    tokenizer: Any
    config: Any
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_decoder(self) -> bool:
        return self.task == "text2text-generation"

    @classmethod
    def from_loaded(cls, loaded: Any, task: str | None = None) -> TextGenerationPipeline:
        """A pipeline over an already loaded model (`load_pretrained`'s result); `task`
        None picks it by the model's kind."""
        from jaxlm.model_config import FAMILIES

        kind = FAMILIES[loaded.config.model.family].kind
        task = task or (TASKS[1] if kind == "encoder_decoder" else TASKS[0])
        params = _on_one_device(loaded.params)
        return cls(task, loaded.model, params, loaded.tokenizer, loaded.config)

    def encode(self, text: str, truncate_for: int | None = None) -> list[int]:
        """Prompt ids; `truncate_for` (max_new_tokens) cuts a long prompt to fit."""
        ids = list(self.tokenizer.encode(text))
        if truncate_for is not None:  # the text is cut, a tokenizer's own BOS/EOS kept
            bos, eos = self.tokenizer.bos_id(), self.tokenizer.eos_id()
            head = ids[:1] if ids[:1] == [bos] else []
            tail = ids[-1:] if len(ids) > len(head) and ids[-1:] == [eos] else []
            body = ids[len(head) : len(ids) - len(tail)]
            if self.encoder_decoder:  # a source of train.seq_len with EOS, as training
                body = body[: self.config.train.seq_len - 1]
            else:  # BOS, then room for the new tokens within max_len
                body = body[-max(self.config.model.max_len - truncate_for - 1, 1) :]
            ids = head + body + tail
        if _is_sentencepiece(self.tokenizer):
            if self.encoder_decoder and self.tokenizer.eos_id() >= 0:
                ids = [*ids, self.tokenizer.eos_id()]
            elif not self.encoder_decoder and self.tokenizer.bos_id() >= 0:
                ids = [self.tokenizer.bos_id(), *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.tokenizer.eos_id(), self.tokenizer.pad_id()} - {-1}
        return self.tokenizer.decode([t for t in ids if t not in special])

    def __call__(self, inputs: str | Sequence[str], **kwargs: Any) -> list:
        from jaxlm.generation import generate_ids

        _check_keywords(self.task, kwargs)
        o = {**DEFAULTS, **self.defaults, **kwargs}
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(t, str) for t in texts):
            raise JaxlmError(f"{self.task}: inputs must be a string or a list of strings")
        n = int(o["num_return_sequences"])
        if n < 1:
            raise JaxlmError(f"num_return_sequences {n}: must be at least 1")
        if n > 1 and not o["do_sample"]:
            raise JaxlmError(
                f"num_return_sequences {n} needs do_sample=True: greedy decoding "
                "gives one sequence per input"
            )
        stops = [o["stop_strings"]] if isinstance(o["stop_strings"], str) else o["stop_strings"]
        cut = int(o["max_new_tokens"]) if o["truncation"] else None
        prompts = [self.encode(t, cut) for t in texts]
        eos = self.tokenizer.eos_id()
        pad = max(self.tokenizer.pad_id(), 0)
        # jaxlm's T5 data starts the decoder from BOS; Hugging Face's T5 from pad.
        start = self.tokenizer.bos_id() if _is_sentencepiece(self.tokenizer) else pad
        out = generate_ids(
            self.model,
            self.params,
            [p for p in prompts for _ in range(n)],
            max_new_tokens=int(o["max_new_tokens"]),
            temperature=float(o["temperature"]) if o["do_sample"] else 0.0,
            top_k=int(o["top_k"] or 0),
            top_p=float(1.0 if o["top_p"] is None else o["top_p"]),
            seed=int(o["seed"]),
            eos_id=eos if eos >= 0 else None,
            stop=[self.tokenizer.encode(s) for s in stops],
            pad_id=pad,
            decoder_start_id=max(start, 0),
        ).tokens
        results = []
        for i, text in enumerate(texts):
            rows = []
            for ids in out[i * n : (i + 1) * n]:
                new = _cut_at_stop(self.decode(ids), stops)
                full = not self.encoder_decoder and o["return_full_text"]
                rows.append({"generated_text": text + new if full else new})
            results.append(rows)
        return results[0] if isinstance(inputs, str) else results


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def pipeline(
    task: str | None,
    model: str | Path,
    *,
    overrides: Sequence[str] = (),
    **defaults: Any,
) -> TextGenerationPipeline:
    """A generation pipeline for the model at `model` (a run, model or Hugging Face
    directory, see `jaxlm.pretrained.load_pretrained`). `defaults` are generation
    keywords used by every call; `overrides` are config `key=value` overrides. `task`
    None picks the task by the model (what `jaxlm generate` does)."""
    from jaxlm.model_config import FAMILIES
    from jaxlm.pretrained import load_pretrained

    if task is not None and task not in TASKS:
        raise JaxlmError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    _check_keywords(task or TASKS[0], defaults)
    loaded = load_pretrained(model, overrides=list(overrides))
    kind = FAMILIES[loaded.config.model.family].kind
    if task is None:
        task = TASKS[1] if kind == "encoder_decoder" else TASKS[0]
        _check_keywords(task, defaults)
    want = "encoder_decoder" if task == "text2text-generation" else "decoder"
    if kind != want:
        article = "a decoder-only" if want == "decoder" else "an encoder-decoder"
        raise JaxlmError(f"{task} needs {article} model; {model} is {loaded.config.model.family}")
    pipe = TextGenerationPipeline.from_loaded(loaded, task)
    pipe.defaults = dict(defaults)
    return pipe


class _CallableModule(types.ModuleType):
    """`jaxlm.pipeline` names this module once it is imported (Python sets a package's
    attribute to its submodule), so the module itself calls `pipeline`."""

    def __call__(
        self, task: str | None, model: str | Path, **kwargs: Any
    ) -> TextGenerationPipeline:
        return pipeline(task, model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
