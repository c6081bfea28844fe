"""Supervised fine-tuning data: prompt -> completion pairs and conversations, tokenized
with the tokens the loss counts marked, truncated to a row and packed.

Records are JSONL objects in one of the two forms TRL and the Hugging Face hub use
(field names from `data.prompt_field`, `data.completion_field`, `data.messages_field`):

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

A pair is `[BOS] prompt completion [EOS]`, prompt and completion tokenized on their own
(so the completion's tokens are those the model writes after the prompt it is given at
inference); the completion and EOS are trained on. A conversation is rendered by the
chat template and tokenized as transformers' `apply_chat_template` does; the
assistant's tokens are trained on (jaxlm/data/chat.py). `data.train_on` picks every
assistant turn (or the completion), the last one, or all tokens.

Tokens the loss does not count keep their place as context: their target is
`IGNORE_TARGET` (-100, Hugging Face's ignore index), which the causal-LM objective
leaves out of the loss, the perplexity and the token count. So the batch is the
pretraining batch (inputs, targets, segment ids, positions) and every decoder family,
mesh and step variant trains on it unchanged.

Every example is encoded once, up front, so a bad template or record fails before any
compile and the truncation count is known at the start. An example longer than
`train.seq_len + 1` tokens loses tokens from `data.truncation_side` (right: its end, as
transformers truncates by default); one left with no counted token is skipped. Rows are
packed best-fit from whole examples (grain's BestFitPackIterDataset), never split
across rows; segment ids and positions keep examples apart as in pretraining.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np
from etils import epath

from jaxlm.data import chat
from jaxlm.data.pipeline import READ_OPTIONS, _rename
from jaxlm.data.sources import jsonl_file_records, list_files
from jaxlm.errors import ConfigError, JaxlmError

IGNORE_TARGET = -100  # a target the loss skips (any negative one is skipped)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Record:
    """One example and where it came from (for error messages)."""

    file: str
    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None

    @property
    def where(self) -> str:
        return f"data file {self.file}, line {self.line}"


def _first_record(path: str) -> Any:
    """The first record of the first file when it is JSONL (None otherwise, or when
    it is not valid JSON: reading the data names the line)."""
    file = list_files(path)[0]
    if file.suffix not in (".jsonl", ".json"):
        return None
    with file.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw.decode("utf-8", errors="replace"))
                except json.JSONDecodeError:
                    return None
    return None


def looks_like_sft(
    path: str, messages_field: str, prompt_field: str, completion_field: str
) -> bool:
    """`data.format=auto`: the first JSONL record holds the messages field, or both the
    prompt and completion fields."""
    try:
        record = _first_record(path)
    except JaxlmError:
        return False  # no files: reading the data says so
    if not isinstance(record, dict):
        return False
    return messages_field in record or (prompt_field in record and completion_field in record)


def _messages(value: Any, where: str, d: Any) -> tuple[dict[str, Any], ...]:
    key = d.messages_field
    if not isinstance(value, list) or not value:
        raise JaxlmError(f"{where}: field {key!r} must be a non-empty list of messages")
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise JaxlmError(f"{where}: message {number} of {key!r} has no string 'role'")
        if message["role"] not in ROLES:
            raise JaxlmError(
                f"{where}: message {number} has role {message['role']!r} "
                f"(roles: {', '.join(ROLES)})"
            )
        if not isinstance(message.get("content"), str):
            raise JaxlmError(f"{where}: message {number} has no string 'content'")
        if message["role"] == "assistant" and not message["content"].strip():
            raise JaxlmError(f"{where}: message {number} (assistant) is empty")
    if d.train_on != "all" and not any(m["role"] == "assistant" for m in value):
        raise JaxlmError(
            f"{where}: no assistant message to train on (data.train_on=all trains on every token)"
        )
    return tuple(value)


def parse_record(file: str, line: int, record: Any, d: Any) -> Record:
    """A JSONL record as an example; a record without the fields is one error naming
    the file and line."""
    where = f"data file {file}, line {line}"
    fields = (d.prompt_field, d.completion_field)
    if not isinstance(record, dict):
        raise JaxlmError(f"{where}: not a JSON object")
    if d.messages_field in record:
        return Record(file, line, messages=_messages(record[d.messages_field], where, d))
    if any(f in record for f in fields):
        for name, key in zip(fields, ("data.prompt_field", "data.completion_field"), strict=True):
            if not isinstance(record.get(name), str):
                raise JaxlmError(f"{where}: no string field {name!r} (set {key})")
        if not record[d.completion_field].strip():
            raise JaxlmError(f"{where}: empty completion (field {d.completion_field!r})")
        return Record(
            file, line, prompt=record[d.prompt_field], completion=record[d.completion_field]
        )
    raise JaxlmError(
        f"{where}: no {d.messages_field!r} list and no {d.prompt_field!r}/{d.completion_field!r} "
        "strings (set data.messages_field, or data.prompt_field and data.completion_field)"
    )


def read_records(path: str, d: Any) -> list[Record]:
    """Every example of the JSONL files at `path`, in file order."""
    expected = (
        f"supervised fine-tuning data must be JSONL records with a {d.messages_field!r} "
        f"list or {d.prompt_field!r}/{d.completion_field!r} strings"
    )
    records = [
        parse_record(str(file), line, record, d)
        for file, line, record in jsonl_file_records(path, expected)
    ]
    if not records:
        raise JaxlmError(f"data.path: no examples at {path!r}")
    return records


def corpus(records: Sequence[Record]) -> list[str]:
    """The text a new tokenizer is trained on: every prompt, completion and message."""
    texts: list[str] = []
    for r in records:
        if r.messages is not None:
            texts += [m["content"] for m in r.messages if m["content"].strip()]
        else:
            texts += [t for t in (r.prompt, r.completion) if t and t.strip()]
    return texts


def resolve_template(d: Any, tokenizer: Any) -> tuple[str, str]:
    """(chat template, where it came from): `data.chat_template` (a file or the
    template's text), else the tokenizer's own, else jaxlm's default."""
    given = d.chat_template
    if given:
        if "{{" in given or "{%" in given:
            source, origin = given, "data.chat_template"
        else:
            path = epath.Path(given)
            if not path.is_file():
                raise ConfigError(
                    "data.chat_template", f"{given}: no such file (a .jinja file or the template)"
                )
            source, origin = path.read_text(), str(path)
    elif getattr(tokenizer, "chat_template", None):
        source, origin = tokenizer.chat_template, "the tokenizer's chat template"
    else:
        source, origin = chat.DEFAULT_CHAT_TEMPLATE, "jaxlm's default chat template"
    try:
        chat.compile_template(source)
    except chat.ChatTemplateError as err:
        raise JaxlmError(f"{origin}: {err}") from None
    return source, origin


class Encoder:
    """Token ids and trained-on weights (1/0 per token) of records."""

    def __init__(self, tokenizer: Any, d: Any, template: str | None = None) -> None:
        self.tokenizer, self.train_on, self.template = tokenizer, d.train_on, template

    def __call__(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        if record.messages is not None:
            try:
                ids, weights = chat.encode_chat(
                    tok, self.template or chat.DEFAULT_CHAT_TEMPLATE, record.messages, self.train_on
                )
            except chat.ChatTemplateError as err:
                raise JaxlmError(f"{record.where}: {err}") from None
        else:
            eos = tok.eos_id()
            bos = tok.bos_id() if tok.bos_id() >= 0 else eos  # as pretraining documents
            prompt, completion = tok.encode(record.prompt), tok.encode(record.completion)
            ids = [bos, *prompt, *completion, eos]
            weights = [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
            if self.train_on == "all":
                weights = [1] * len(ids)
        return np.asarray(ids, np.int32), np.asarray(weights, np.int32)


def to_row(
    ids: np.ndarray, weights: np.ndarray, seq_len: int, side: str = "right"
) -> tuple[dict[str, np.ndarray] | None, bool]:
    """(inputs and targets of one example, whether it was truncated); None when no
    target is counted. Targets not trained on are IGNORE_TARGET."""
    keep = seq_len + 1
    truncated = len(ids) > keep
    if truncated:
        cut = slice(None, keep) if side == "right" else slice(-keep, None)
        ids, weights = ids[cut], weights[cut]
    if len(ids) < 2 or not weights[1:].any():
        return None, truncated
    return {"inputs": ids[:-1], "targets": targets_of(ids[1:], weights[1:])}, truncated


def targets_of(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The targets of labels (each input's next token): IGNORE_TARGET where the
    token is not trained on."""
    return np.where(weights > 0, labels, IGNORE_TARGET).astype(np.int32)


@dataclass
class Report:
    """What encoding a split did, for the log line at the start of training."""

    examples: int = 0
    conversations: int = 0
    truncated: int = 0
    skipped: int = 0  # truncated to no counted token
    tokens: int = 0
    counted: int = 0
    template: str = ""
    skipped_at: list[str] = field(default_factory=list)

    def __add__(self, other: Report) -> Report:
        return Report(
            self.examples + other.examples,
            self.conversations + other.conversations,
            self.truncated + other.truncated,
            self.skipped + other.skipped,
            self.tokens + other.tokens,
            self.counted + other.counted,
            self.template or other.template,
            self.skipped_at + other.skipped_at,
        )


def encode_records(
    records: Sequence[Record], tokenizer: Any, d: Any, seq_len: int
) -> tuple[list[dict[str, np.ndarray]], Report]:
    """Rows (inputs, targets) of every example that keeps a counted token."""
    report = Report(examples=len(records))
    template = None
    if any(r.messages is not None for r in records):
        template, report.template = resolve_template(d, tokenizer)
    encode = Encoder(tokenizer, d, template)
    rows = []
    for record in records:
        ids, weights = encode(record)
        row, truncated = to_row(ids, weights, seq_len, d.truncation_side)
        report.conversations += record.messages is not None
        report.truncated += truncated
        if row is None:
            report.skipped += 1
            report.skipped_at.append(record.where)
            continue
        rows.append(row)
        report.tokens += len(row["inputs"])
        report.counted += int((row["targets"] >= 0).sum())
    return rows, report


def describe(train: Report, held_out: Report, d: Any, seq_len: int) -> str:
    """The log line: examples, template, truncation and counted tokens."""
    total = train + held_out
    kinds = f"{total.conversations} conversations, {total.examples - total.conversations} pairs"
    lines = [
        f"sft: {train.examples} training and {held_out.examples} held-out examples ({kinds}); "
        f"the loss counts {d.train_on} tokens: {total.counted:,} of {total.tokens:,}"
        + (f"; template: {total.template}" if total.template else "")
    ]
    lines.append(
        f"sft: {total.truncated} of {total.examples} examples are longer than train.seq_len + 1 "
        f"= {seq_len + 1} tokens and were truncated from the {d.truncation_side} "
        f"(data.truncation_side); {total.skipped} kept no trained token and were skipped"
        + (f" (first: {total.skipped_at[0]})" if total.skipped_at else "")
    )
    return "\n".join(lines)


def sft_stream(
    examples: Sequence[dict[str, np.ndarray]],
    tokenizer: Any,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """One stream of packed SFT batches (the `make_stream` of data/pipeline.py) from
    encoded rows: whole examples packed best-fit, padding the rest of a row."""
    ds = grain.MapDataset.source(list(examples))[index::num_streams]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    packed = grain.experimental.BestFitPackIterDataset(
        ds.to_iter_dataset(READ_OPTIONS),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=max(rows, 16),
        seed=seed,
        shuffle_bins=shuffle,
    )
    return packed.map(_rename).batch(rows, drop_remainder=True)
