"""`jaxlm eval`: perplexity and bits per byte against an independent per-document
computation, BLEU/ROUGE against sacrebleu and rouge-score, BERT's accuracies."""

import json
import math
import subprocess

import jax
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data.pipeline import make_dataset
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import cached_tokenizer
from jaxlm.evaluation import evaluate_model, overlap_scores
from jaxlm.models import build_model
from jaxlm.pretrained import load_pretrained, save_pretrained

from .conftest import CORPUS, TINY


@pytest.fixture
def jaxlm(capsys):
    """`jaxlm ARGS` through `main` in this process: its exit code and captured output."""

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


SEQ = 64


def make_model_dir(path, overrides, docs):
    config = load_config(None, [*TINY, *overrides, "name=eval", "model.vocab_size=512"])
    cached_tokenizer(docs, path / "tokenizer.model", 512, "bpe")
    model = build_model(config.model)
    params = model.init(jax.random.PRNGKey(1), np.zeros((1, SEQ), np.int32))["params"]
    save_pretrained(path, config, jax.tree_util.tree_map(np.asarray, params))
    return path


@pytest.fixture(scope="module")
def corpus_docs():
    return read_documents(str(CORPUS))[:600]


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory, corpus_docs):
    return make_model_dir(tmp_path_factory.mktemp("gpt"), [], corpus_docs)


def test_perplexity_and_bits_per_byte_match_a_per_document_reference(gpt_dir, tmp_path, jaxlm):
    model, params, tok, _ = load_pretrained(gpt_dir)
    # Short lines, each shorter than a row: packing must not change any token's context.
    lines = [line for line in CORPUS.read_text().splitlines()[:400] if line.strip()]
    docs = [d for d in lines if len(tok.encode(d)) + 1 < SEQ][:48]
    data = tmp_path / "lines.jsonl"  # one document per record, exactly these
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    # The reference: each packed segment alone through the model (no packing mask, no
    # batching, no padding), its log-softmax in NumPy.
    rows = make_dataset(docs, tok, seq_len=SEQ, batch_size=1, seed=0, shuffle=False, repeat=False)
    # Segments padded at the end to one shape: causal, so padding changes no real logit.
    forward = jax.jit(lambda x, pos: model.apply({"params": params}, x, None, pos))
    total, count = 0.0, 0
    for row in rows:
        for seg in set(row["segment_ids"][0].tolist()) - {0}:
            at = row["segment_ids"][0] == seg
            inputs, targets = row["inputs"][0][at], row["targets"][0][at]
            n = len(targets)
            padded = np.zeros((1, SEQ), np.int32)
            padded[0, :n] = inputs
            positions = np.zeros((1, SEQ), np.int32)
            positions[0, :n] = row["positions"][0][at]
            logits = np.asarray(forward(padded, positions))[0, :n]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            total -= float(logp[np.arange(len(targets)), targets].sum())
            count += len(targets)
    assert count == sum(len(tok.encode(d)) + 1 for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)

    out_json = tmp_path / "eval.json"
    out = jaxlm(
        "eval", str(gpt_dir), "--data", str(data), "--batch-size", "8", "--json", str(out_json)
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out_json.read_text())
    assert "perplexity" in out.stdout and "bits_per_byte" in out.stdout
    assert results["tokens"] == count
    assert results["bytes"] == n_bytes
    assert results["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert results["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-4)


def test_eval_is_independent_of_batch_size(gpt_dir, corpus_docs):
    pretrained = load_pretrained(gpt_dir)
    docs = corpus_docs[-60:]
    by4 = evaluate_model(pretrained, docs, batch_size=4, seq_len=SEQ)
    by8 = evaluate_model(pretrained, docs, batch_size=8, seq_len=SEQ)
    assert by4["tokens"] == by8["tokens"]
    assert by4["loss"] == pytest.approx(by8["loss"], rel=1e-5)


def test_bleu_and_rouge_equal_the_reference_packages(tmp_path, jaxlm):
    preds = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox jumped", "hello world"]
    file = tmp_path / "pred.jsonl"
    file.write_text(
        "".join(
            json.dumps({"prediction": p, "tgt": r}) + "\n" for p, r in zip(preds, refs, strict=True)
        )
    )
    out_json = tmp_path / "scores.json"
    out = jaxlm("eval", "--predictions", str(file), "--json", str(out_json))
    assert out.returncode == 0, out.stderr
    got = json.loads(out_json.read_text())

    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * np.mean(
            [scorer.score(r, p)[name].fmeasure for p, r in zip(preds, refs, strict=True)]
        )
        assert got[name] == pytest.approx(expected, abs=1e-9)
    assert got["examples"] == 3
    assert overlap_scores(refs, refs)["bleu"] == pytest.approx(100.0)


def test_bad_eval_inputs_fail_readably(tmp_path, jaxlm):
    file = tmp_path / "pred.jsonl"
    file.write_text('{"prediction": "x"}\n')
    out = jaxlm("eval", "--predictions", str(file))
    assert out.returncode == 2
    assert "tgt" in out.stderr and "Traceback" not in out.stderr
    out = jaxlm("eval")
    assert out.returncode == 2 and "needs a MODEL" in out.stderr


def test_mlm_and_nsp_accuracy_match_a_numpy_count(tmp_path, corpus_docs):
    from jaxlm.data import mlm
    from jaxlm.data.pipeline import make_dataset
    from jaxlm.data.tokenizer import train_tokenizer

    overrides = ["model.family=bert", "model.d_ff=128", "model.type_vocab_size=2"]
    config = load_config(None, [*TINY, *overrides, "name=b", "model.vocab_size=512"])
    train_tokenizer(corpus_docs, tmp_path / "tokenizer.model", 512, "bpe", (mlm.MASK_PIECE,))
    model = build_model(config.model)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, SEQ), np.int32))["params"]
    save_pretrained(tmp_path, config, jax.tree_util.tree_map(np.asarray, params))

    pretrained = load_pretrained(tmp_path)
    docs = corpus_docs[:200]
    results = evaluate_model(pretrained, docs, batch_size=8, seq_len=SEQ)

    batches = make_dataset(
        docs,
        pretrained.tokenizer,
        seq_len=SEQ,
        batch_size=8,
        seed=0,
        shuffle=False,
        repeat=False,
        make_stream=mlm.mlm_stream,
    )
    forward = jax.jit(lambda *args: pretrained.model.apply({"params": pretrained.params}, *args))
    correct = chosen = nsp_right = rows = 0
    for b in batches:
        mlm_logits, nsp_logits = forward(b["inputs"], b["token_types"], b["segment_ids"])
        hit = np.argmax(np.asarray(mlm_logits), -1) == b["targets"]
        correct += int((hit & (b["mlm_mask"] > 0)).sum())
        chosen += int((b["mlm_mask"] > 0).sum())
        nsp_right += int((np.argmax(np.asarray(nsp_logits), -1) == b["nsp_labels"]).sum())
        rows += len(b["nsp_labels"])
    assert results["masked_tokens"] == chosen > 0
    assert results["mlm_accuracy"] == pytest.approx(correct / chosen, abs=1e-6)
    assert results["nsp_accuracy"] == pytest.approx(nsp_right / rows, abs=1e-6)
