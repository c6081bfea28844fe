"""The bundled task splits (no test passage in training, every answer span in its
context) and `jaxlm eval --task`: scoring given predictions, generating through
`jaxlm.pipeline`, dialogue perplexity against a NumPy reference, and bad input."""

import json
import math

import jax
import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.evaluation import tasks

from .conftest import REPO

SEQ = 64
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2"]
SHARED = REPO.parent / "shared" / "data"


def records(name, split):
    path = tasks.task_file(name, split)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_splits_share_no_article_passage_or_paper():
    qa = {s: records("qa", s) for s in ("train", "test")}
    test_titles = {r["title"] for r in qa["test"]}
    assert test_titles and not test_titles & {r["title"] for r in qa["train"]}
    assert not {r["context"] for r in qa["test"]} & {r["context"] for r in qa["train"]}
    for name in ("translation", "dialogue"):
        train, test = records(name, "train"), records(name, "test")
        assert {r["title"] for r in test} == test_titles  # one article split for all
        assert not {r["title"] for r in train} & test_titles
        assert not {r["id"] for r in train} & {r["id"] for r in test}
    passages = {r["context"] for r in qa["test"]}
    train_src = {r["src"] for r in records("translation", "train")}
    assert not passages & train_src
    train_dialogue = {m["content"] for r in records("dialogue", "train") for m in r["messages"]}
    assert not any(p in text for p in passages for text in train_dialogue if len(text) > 200)
    summ = {s: records("summarization", s) for s in ("train", "test")}
    assert not {r["id"] for r in summ["train"]} & {r["id"] for r in summ["test"]}
    assert not {r["document"] for r in summ["train"]} & {r["document"] for r in summ["test"]}
    for name in tasks.TASKS:  # every record reads, every answer span is in its context
        for split in ("train", "test"):
            assert tasks.read_task(name, tasks.task_file(name, split))[0]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_split_script_rewrites_the_bundled_files(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("split_tasks", REPO / "scripts/split_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--shared", str(SHARED), "--out", str(tmp_path)])
    for path in sorted(tmp_path.glob("*/*.jsonl")):
        assert path.read_bytes() == (tasks.TASK_DIR / path.relative_to(tmp_path)).read_bytes()


def run(*args):
    return main(["eval", *map(str, args)])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_predictions_are_scored_against_the_task_data(tmp_path):
    qa = [q for r in records("qa", "test") for q in r["qas"]]
    # first: gold (EM 1); second: gold + one extra word; third: wrong
    gold1, gold2 = qa[0]["answers"]["text"][0], qa[1]["answers"]["text"][0]
    preds = [
        {"id": qa[0]["id"], "prediction": f"The {gold1}."},
        {"id": qa[1]["id"], "prediction": f"{gold2} zzz"},
        {"id": qa[2]["id"], "prediction": "zzz"},
    ]
    from jaxlm.evaluation.squad import normalize_answer

    n2 = len(normalize_answer(gold2).split())
    out = tmp_path / "qa.json"
    assert (
        run(
            "--task", "qa", "--predictions", write_jsonl(tmp_path / "p.jsonl", preds), "--json", out
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert got["examples"] == 3 and got["split_examples"] == 253
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (1 + 2 * n2 / (2 * n2 + 1)) / 3)

    pairs = records("translation", "test")
    preds = [{"id": r["id"], "prediction": r["tgt"]} for r in pairs]
    assert (
        run(
            "--task",
            "translation",
            "--predictions",
            write_jsonl(tmp_path / "t.jsonl", preds),
            "--json",
            out,
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert got["bleu"] == pytest.approx(100) and got["chrf"] == pytest.approx(100)
    assert "tok:13a" in got["bleu_signature"]

    summ = records("summarization", "test")  # the last reference: ROUGE takes the best
    preds = [{"id": r["id"], "prediction": r["references"][-1]} for r in summ]
    assert (
        run(
            "--task",
            "summarization",
            "--predictions",
            write_jsonl(tmp_path / "s.jsonl", preds),
            "--json",
            out,
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert got["examples"] == 100 and got["rouge1"] == pytest.approx(100)


def one_line_error(capsys, *args):
    capsys.readouterr()
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_task_input_is_one_line(tmp_path, capsys):
    assert "unknown task 'poetry'" in one_line_error(
        capsys, "--task", "poetry", "--predictions", "x"
    )
    good = records("qa", "test")[0]
    missing = write_jsonl(tmp_path / "missing.jsonl", [good, {"id": "x", "context": "c"}])
    err = one_line_error(capsys, "x", "--task", "qa", "--data", missing)
    assert f"{missing}, line 2" in err and "'qas'" in err
    no_q = dict(good, qas=[{"id": "q", "answers": good["qas"][0]["answers"]}])
    err = one_line_error(
        capsys, "x", "--task", "qa", "--data", write_jsonl(tmp_path / "q.jsonl", [no_q])
    )
    assert "line 1, question 1" in err and "'question'" in err
    moved = json.loads(json.dumps(good))
    moved["qas"][0]["answers"]["answer_start"][0] += 1
    err = one_line_error(
        capsys, "x", "--task", "qa", "--data", write_jsonl(tmp_path / "s.jsonl", [moved])
    )
    assert "line 1, question 1" in err and "is not in the context at answer_start" in err
    bad = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "src": "Hello"}])
    assert "'tgt'" in one_line_error(
        capsys, "--task", "translation", "--data", bad, "--predictions", bad
    )
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "nope", "prediction": "x"}])
    err = one_line_error(capsys, "--task", "qa", "--predictions", preds)
    assert f"{preds}, line 1" in err and "'nope'" in err


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """A tiny randomly initialised GPT saved as a model directory (init jitted: one
    compile instead of op-by-op dispatch)."""
    from jaxlm.config import load_config
    from jaxlm.data.sources import read_documents
    from jaxlm.data.tokenizer import cached_tokenizer
    from jaxlm.models import build_model
    from jaxlm.pretrained import save_pretrained

    from .conftest import CORPUS, TINY

    path = tmp_path_factory.mktemp("gpt")
    config = load_config(None, [*TINY, *SMALL, "name=tasks", "model.vocab_size=512"])
    cached_tokenizer(read_documents(str(CORPUS))[:600], path / "tokenizer.model", 512, "bpe")
    model = build_model(config.model)
    init = jax.jit(model.init)
    params = init(jax.random.PRNGKey(1), np.zeros((1, SEQ), np.int32))["params"]
    save_pretrained(path, config, jax.tree_util.tree_map(np.asarray, params))
    return path


def test_generated_outputs_are_the_pipelines(gpt_dir, tmp_path):
    import jaxlm.pipeline

    data = tmp_path / "qa.jsonl"
    write_jsonl(data, records("qa", "test")[:1])  # one passage: ~5 questions, one batch
    preds = tmp_path / "out.jsonl"
    out = tmp_path / "r.json"
    args = ("--task", "qa", "--data", data, "--max-new-tokens", 4, "--max-examples", 2)
    assert run(gpt_dir, *args, "--write-predictions", preds, "--json", out) == 0
    written = [json.loads(line) for line in preds.read_text().splitlines()]
    examples, _ = tasks.read_task("qa", data)
    assert [w["id"] for w in written] == [e.id for e in examples[:2]]
    # the pipeline users call, on the same prompts (longer than the model: cut to fit)
    pipe = jaxlm.pipeline("text-generation", model=gpt_dir)
    tok = pipe.tokenizer  # a decoder's long prompt keeps BOS and its last tokens
    room = pipe.config.model.max_len - 4 - 1
    assert pipe.encode(examples[0].prompt, 4) == [
        tok.bos_id(),
        *tok.encode(examples[0].prompt)[-room:],
    ]
    got = pipe([e.prompt for e in examples[:2]], max_new_tokens=4, truncation=True)
    assert [w["prediction"] for w in written] == [
        rows[0]["generated_text"][len(e.prompt) :] for rows, e in zip(got, examples, strict=False)
    ]
    from jaxlm.evaluation.squad import squad_scores

    expected = squad_scores(
        [w["prediction"] for w in written], [e.references for e in examples[:2]]
    )
    results = json.loads(out.read_text())
    assert results["exact_match"] == pytest.approx(expected["exact_match"])
    assert results["f1"] == pytest.approx(expected["f1"])


def test_dialogue_perplexity_is_of_the_assistant_turns(gpt_dir, tmp_path):
    from jaxlm.data import chat
    from jaxlm.pretrained import load_pretrained

    convs = [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "Who is the king?"},
                {"role": "assistant", "content": "Richard."},
                {"role": "user", "content": "Where?"},
                {"role": "assistant", "content": "In London."},
            ],
        },
        {
            "id": "b",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Speak."},
                {"role": "assistant", "content": "I will not."},
            ],
        },
    ]
    data = write_jsonl(tmp_path / "d.jsonl", convs)
    out = tmp_path / "d.json"
    assert run(gpt_dir, "--task", "dialogue", "--data", data, "--json", out) == 0
    got = json.loads(out.read_text())

    # Reference: each conversation alone through the model, log-softmax in NumPy, summed
    # over the targets that are assistant tokens (the content and its closing EOS).
    model, params, tok, _ = load_pretrained(gpt_dir)
    forward = jax.jit(lambda x, pos: model.apply({"params": params}, x, None, pos))
    total, count = 0.0, 0
    for conv in convs:
        ids, weights = chat.encode_chat(tok, chat.DEFAULT_CHAT_TEMPLATE, conv["messages"])
        assert len(ids) <= SEQ + 1
        n = len(ids) - 1
        x = np.zeros((1, SEQ), np.int32)
        x[0, :n] = ids[:-1]
        positions = np.zeros((1, SEQ), np.int32)
        positions[0, :n] = np.arange(n)
        logits = np.asarray(forward(x, positions), np.float64)[0, :n]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        at = np.asarray(weights[1:]) > 0
        total -= float(logp[np.arange(n), np.asarray(ids[1:])][at].sum())
        count += int(at.sum())
    assert got["assistant_tokens"] == count > 0
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
