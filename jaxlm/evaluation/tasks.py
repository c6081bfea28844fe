"""The evaluation tasks, in one registry: each task's record format, prompt convention
and metrics (`jaxlm eval MODEL --task NAME`; data in data/tasks/, see its README).

- summarization: {id, document, summary, [references]}; prompt `summarize: DOC`;
  ROUGE-1/2/L F (stemmed, best of the references).
- qa: {id, context, qas: [{id, question, answers: {text, answer_start}}]} (SQuAD's
  layout, one passage a line); prompt `context: PASSAGE question: Q`; SQuAD exact match
  and F1 (best of the answers).
- translation: {id, src (English), tgt (German)}; prompt
  `translate English to German: SRC`; sacrebleu BLEU and chrF.
- dialogue: {id, messages} (the SFT chat format); the chat template; perplexity of the
  assistant turns.

One prompt convention serves fine-tuning and evaluation, T5 and decoders alike (T5's
task prefixes): the model reads `prompt` and is trained to write `target`, as a T5
source/target pair or an SFT prompt/completion pair (`training_records`). Evaluation
generates greedily from `prompt` through `jaxlm.pipeline`, so the prompt is encoded as
`jaxlm generate` encodes it. QA puts the passage before the question, as the issue's
"context + question -> answer": a decoder's prompt cut to fit (from the left) keeps
the question; a T5 source is cut from the right, so T5 wants a `train.seq_len` that
holds the passages. Dialogue is not generated: the model's perplexity on the assistant
turns of held-out conversations (rendered by the chat template, as SFT trains on them)
is its score.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlm.errors import JaxlmError
from jaxlm.evaluation.overlap import bleu_chrf, rouge
from jaxlm.evaluation.squad import squad_scores
from jaxlm.model_config import family_of

TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"


@dataclass(frozen=True)
class Example:
    """One scored item: what the model reads, what it should write, the references it
    is scored against."""

    id: str
    prompt: str
    target: str
    references: tuple[str, ...]


def _strings(record: dict, keys: Sequence[str], where: str, kind: str) -> None:
    for key in keys:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise JaxlmError(
                f"{where}: a {kind} record needs a non-empty string field {key!r} "
                f"(fields: {', '.join(keys)})"
            )


def _summarization(record: dict, where: str) -> list[Example]:
    _strings(record, ("id", "document", "summary"), where, "summarization")
    refs = record.get("references") or [record["summary"]]
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise JaxlmError(f"{where}: 'references' must be a list of non-empty strings")
    prompt = f"summarize: {record['document']}"
    return [Example(record["id"], prompt, record["summary"], tuple(refs))]


def _qa(record: dict, where: str) -> list[Example]:
    _strings(record, ("id", "context"), where, "qa")
    qas = record.get("qas")
    if not isinstance(qas, list) or not qas:
        raise JaxlmError(f"{where}: a qa record needs a non-empty list 'qas' of questions")
    context, examples = record["context"], []
    for n, qa in enumerate(qas, 1):
        at = f"{where}, question {n}"
        if not isinstance(qa, dict):
            raise JaxlmError(f"{at}: not a JSON object")
        _strings(qa, ("id", "question"), at, "qa question")
        answers = qa.get("answers")
        texts = answers.get("text") if isinstance(answers, dict) else None
        starts = answers.get("answer_start") if isinstance(answers, dict) else None
        if (
            not isinstance(texts, list)
            or not isinstance(starts, list)
            or not texts
            or len(texts) != len(starts)
        ):
            raise JaxlmError(
                f"{at}: 'answers' must be {{'text': [...], 'answer_start': [...]}}, "
                "non-empty lists of one length"
            )
        for text, start in zip(texts, starts, strict=True):
            ok = isinstance(text, str) and text and isinstance(start, int) and start >= 0
            if not ok or context[start : start + len(text)] != text:
                found = context[start : start + len(text)] if ok else None
                raise JaxlmError(
                    f"{at}: answer {text!r} is not in the context at answer_start {start!r}"
                    + (f" (the context there reads {found!r})" if found is not None else "")
                )
        # the passage first: a decoder's prompt cut to fit keeps the question
        prompt = f"context: {context} question: {qa['question']}"
        examples.append(Example(qa["id"], prompt, texts[0], tuple(texts)))
    return examples


def _translation(record: dict, where: str) -> list[Example]:
    _strings(record, ("id", "src", "tgt"), where, "translation")
    prompt = f"translate English to German: {record['src']}"
    return [Example(record["id"], prompt, record["tgt"], (record["tgt"],))]


def _dialogue(record: dict, where: str) -> list[Example]:
    from jaxlm.config import DataConfig
    from jaxlm.data import sft

    _strings(record, ("id",), where, "dialogue")
    file, line = where.rsplit(", line ", 1)
    if "messages" not in record:
        raise JaxlmError(f"{where}: a dialogue record needs a list field 'messages'")
    sft.parse_record(file, int(line), record, DataConfig())  # the SFT reader's checks
    return [Example(record["id"], "", "", ())]


@dataclass(frozen=True)
class Task:
    name: str
    fields: str  # the record format, for help and errors
    metrics: tuple[str, ...]
    read: Callable[[dict, str], list[Example]]
    score: Callable[[Sequence[str], Sequence[Example]], dict[str, Any]] | None
    generated: bool = True  # False: scored by perplexity, not by generated text
    # For a model that generates no text (an encoder with a task head): its answers
    # from its logits, (loaded, records, examples, batch_size=, seq_len=) -> texts.
    extract: Callable[..., list[str]] | None = None


def _rouge(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, Any]:
    return rouge(predictions, [list(e.references) for e in examples])


def _squad(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, Any]:
    return squad_scores(predictions, [list(e.references) for e in examples])


def _bleu(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, Any]:
    return bleu_chrf(predictions, [e.references[0] for e in examples])


def _extractive_qa(loaded: Any, records: Sequence[dict], examples: Sequence[Example], **kw):
    from jaxlm.evaluation.extractive import extractive_answers  # jax, only when used

    return extractive_answers(loaded, records, examples, **kw)


TASKS: dict[str, Task] = {
    "summarization": Task(
        "summarization",
        "id, document, summary, references (optional list)",
        ("rouge1", "rouge2", "rougeL"),
        _summarization,
        _rouge,
    ),
    "qa": Task(
        "qa",
        "id, context, qas [{id, question, answers {text, answer_start}}]",
        ("exact_match", "f1"),
        _qa,
        _squad,
        extract=_extractive_qa,
    ),
    "translation": Task("translation", "id, src, tgt", ("bleu", "chrf"), _translation, _bleu),
    "dialogue": Task("dialogue", "id, messages", ("perplexity",), _dialogue, None, False),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise JaxlmError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_file(name: str, split: str = "test") -> Path:
    """The bundled split of a task."""
    path = TASK_DIR / get_task(name).name / f"{split}.jsonl"
    if not path.is_file():
        raise JaxlmError(f"task {name!r}: no bundled {split} split at {path}; pass --data FILE")
    return path


def _jsonl(path: Path, flag: str) -> list[tuple[str, dict]]:
    """(where, record) of each non-empty line; one error naming file and line else."""
    if not path.is_file():
        raise JaxlmError(f"{flag} {path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JaxlmError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise JaxlmError(f"{where}: not a JSON object")
            out.append((where, record))
    if not out:
        raise JaxlmError(f"{flag} {path}: no records")
    return out


def read_task(name: str, path: str | Path | None = None) -> tuple[list[Example], list[dict]]:
    """(examples, raw records) of a task file (default: its bundled test split), every
    record checked before any model work."""
    task = get_task(name)
    path = Path(path) if path else task_file(name)
    pairs = _jsonl(path, "--data")
    examples = [e for where, record in pairs for e in task.read(record, where)]
    seen: set[str] = set()
    for e in examples:
        if e.id in seen:
            raise JaxlmError(f"{path}: id {e.id!r} appears twice")
        seen.add(e.id)
    return examples, [record for _, record in pairs]


def training_records(name: str, split: str = "train") -> list[dict[str, str]]:
    """A generated task's split as {"prompt", "completion"} records (SFT; for T5 the
    same strings are the source and target), one per example."""
    if not get_task(name).generated:
        raise JaxlmError(f"task {name!r}: its files are already SFT conversations")
    examples, _ = read_task(name, task_file(name, split))
    return [{"prompt": e.prompt, "completion": e.target} for e in examples]


def read_predictions(path: str | Path, examples: Sequence[Example]) -> list[tuple[str, Example]]:
    """(prediction, example) pairs of a JSONL file of {"id", "prediction"} records, in
    the file's order; ids must be the task data's."""
    by_id = {e.id: e for e in examples}
    out: list[tuple[str, Example]] = []
    seen: set[str] = set()
    for where, record in _jsonl(Path(path), "--predictions"):
        rid, pred = record.get("id"), record.get("prediction")
        if not isinstance(rid, str) or not isinstance(pred, str):
            raise JaxlmError(f"{where}: a prediction record needs string fields 'id', 'prediction'")
        if rid not in by_id:
            raise JaxlmError(f"{where}: id {rid!r} is not in the task's data")
        if rid in seen:
            raise JaxlmError(f"{where}: id {rid!r} predicted twice")
        seen.add(rid)
        out.append((pred, by_id[rid]))
    return out


def evaluate_task(
    name: str,
    *,
    model: str | None = None,
    data: str | None = None,
    predictions: str | None = None,
    max_examples: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seq_len: int = 0,
    overrides: Sequence[str] = (),
    write_predictions: str | None = None,
) -> tuple[dict[str, Any], str]:
    """(results, title) of a task: `predictions` scored, or `model`'s greedy outputs
    (for dialogue, its perplexity on the assistant turns, conversations cut to `seq_len`
    tokens, 0 = the model's training length, as SFT cuts them)."""
    task = get_task(name)
    examples, records = read_task(name, data)
    source = data or str(task_file(name))
    if predictions:
        if not task.generated:
            raise JaxlmError(f"task {name!r} is scored by perplexity; --predictions does not apply")
        pairs = read_predictions(predictions, examples)
        if max_examples:
            pairs = pairs[:max_examples]
        results = {"task": name, "examples": len(pairs), "split_examples": len(examples)}
        results |= task.score([p for p, _ in pairs], [e for _, e in pairs])
        return results, f"{predictions} on {name} ({source})"
    if not model:
        raise JaxlmError("eval --task needs a MODEL, or --predictions FILE")
    from jaxlm.pretrained import load_pretrained

    loaded = load_pretrained(model, overrides=list(overrides))
    if max_examples:
        examples, records = examples[:max_examples], records[:max_examples]
    if not task.generated:
        results = _dialogue_perplexity(loaded, records, source, batch_size, seq_len)
        return results, f"{model} on {name} ({source})"

    how = f"greedy, {max_new_tokens} new tokens"
    if not family_of(loaded.config.model).generates:  # an encoder: its task head answers
        if not task.extract:
            raise JaxlmError(f"task {name!r} needs generated text; {model} generates none")
        outputs = task.extract(loaded, records, examples, batch_size=batch_size, seq_len=seq_len)
        how = "extractive, best span"
    else:
        from jaxlm.evaluation.generated import generate_texts

        outputs = generate_texts(
            loaded,
            [e.prompt for e in examples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    if write_predictions:
        text = "".join(
            json.dumps({"id": e.id, "prediction": o}, ensure_ascii=False) + "\n"
            for e, o in zip(examples, outputs, strict=True)
        )
        Path(write_predictions).write_text(text, encoding="utf-8")
    results = {"task": name, "examples": len(examples)} | task.score(outputs, examples)
    return results, f"{model} on {name} ({source}; {how})"


def _dialogue_perplexity(
    loaded: Any, records: Sequence[dict], source: str, batch_size: int, seq_len: int
) -> dict[str, Any]:
    from jaxlm.data import sft
    from jaxlm.evaluation.model_eval import evaluate_model

    # The task's fields, the model's own chat template and train_on.
    d = dataclasses.replace(loaded.config.data, messages_field="messages")
    parsed = [sft.parse_record(source, i, r, d) for i, r in enumerate(records, 1)]
    n = seq_len or loaded.config.train.seq_len
    encode = sft.Encoder(loaded.tokenizer, d, sft.resolve_template(d, loaded.tokenizer)[0])
    if not any(encode(r)[1][1 : n + 1].any() for r in parsed):
        raise JaxlmError(
            f"{source}: no conversation has an assistant token within its first {n} tokens; "
            f"raise --seq-len (at most the model's max_len {loaded.config.model.max_len})"
        )
    got = evaluate_model(loaded, parsed, batch_size=batch_size, seq_len=seq_len)
    return {
        "task": "dialogue",
        "conversations": len(parsed),
        "assistant_tokens": got["tokens"],
        "loss": got["loss"],
        "perplexity": got["perplexity"],
    }
