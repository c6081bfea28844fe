"""BERT's extractive QA: the head against transformers' `BertForQuestionAnswering` (a
tiny random checkpoint imports with its start/end logits, exports back in that
format, `jaxlm convert` round-trips it); span decoding against a brute-force NumPy
search; features + decoding round-trip gold answers of the bundled XQuAD split over
several document windows; the QA loss against NumPy, and falling in a few steps."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.cli import main as jaxlm_main
from jaxlm.config import ModelConfig
from jaxlm.data.extractive_qa import qa_features
from jaxlm.data.hf_tokenizer import load_hf_tokenizer
from jaxlm.errors import JaxlmError
from jaxlm.evaluation.span_decoding import best_span, decode_answers
from jaxlm.evaluation.tasks import read_task, task_file
from jaxlm.hf import load_hf_pretrained
from jaxlm.models import build_model
from jaxlm.pretrained import load_pretrained
from jaxlm.train.objectives import for_model

from .test_hf import _batch, _trees_equal, _wordpiece_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
STEPS = 10  # the loss of 8 rows falls below a third of its start by then


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """A directory with a tiny WordPiece tokenizer.json (BERT's specials)."""
    root = tmp_path_factory.mktemp("hf_qa")
    _wordpiece_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def hf_qa(wordpiece):
    """(HF directory, batch, transformers' start and end logits) of a tiny random model."""
    root = wordpiece
    vocab = load_hf_tokenizer(root).get_piece_size()
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).eval()
    with torch.no_grad():  # no zero biases or unit norms: every tensor's role shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root)
    batch = _batch(vocab)
    return root, batch, _hf_logits(model, *batch)


def _hf_logits(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.start_logits.numpy(), out.end_logits.numpy()


def _jaxlm_logits(model, params, ids, mask, types):
    out = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)
    )
    return tuple(np.asarray(x) for x in out)


def _assert_match(got, want, mask, atol=ATOL):
    real = mask.astype(bool)  # padding's logits are not compared
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[real], w[real], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def converted_qa(hf_qa, tmp_path_factory):
    """The tiny checkpoint as a jaxlm model directory, by `jaxlm convert from-hf`."""
    model_dir = tmp_path_factory.mktemp("qa_model") / "jaxlm"
    assert jaxlm_main(["convert", "from-hf", str(hf_qa[0]), str(model_dir)]) == 0
    return model_dir


def test_qa_checkpoint_imports_and_exports_in_transformers_format(hf_qa, converted_qa, tmp_path):
    hf_dir, (ids, mask, types), want = hf_qa
    imported = load_hf_pretrained(hf_dir)
    assert imported.config.model.head == "qa" and not imported.config.model.nsp_head
    assert set(imported.params) == {"encoder", "qa_outputs"}
    assert "pooler" not in imported.params["encoder"]
    assert imported.params["qa_outputs"]["kernel"].shape == (32, 2)
    _assert_match(_jaxlm_logits(imported.model, imported.params, ids, mask, types), want, mask)

    model_dir, out = converted_qa, tmp_path / "hf"
    loaded = load_pretrained(model_dir)
    assert loaded.config.model.head == "qa"
    assert _trees_equal(loaded.params, imported.params)
    assert jaxlm_main(["convert", "to-hf", str(model_dir), str(out)]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForQuestionAnswering"]
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    _assert_match(_hf_logits(back, ids, mask, types), want, mask, atol=1e-6)
    assert _trees_equal(load_hf_pretrained(out).params, imported.params)


def _brute_force(start, end, offsets, max_len):
    """(score, row, start, end) of the best span by trying every pair."""
    best = None
    for r in range(start.shape[0]):
        for i in range(start.shape[1]):
            for j in range(i, min(i + max_len, start.shape[1])):
                if offsets[r, i, 0] < 0 or offsets[r, j, 0] < 0:
                    continue
                score = start[r, i] + end[r, j]
                if best is None or score > best[0]:
                    best = (score, r, i, j)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_span_decoding_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows, length, max_len = int(rng.integers(1, 4)), 16, int(rng.integers(1, 6))
    offsets = np.full((rows, length, 2), -1, np.int32)
    for r in range(rows):  # [CLS] question [SEP] context [SEP] padding
        head, n = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        offsets[r, head : head + n, 0] = np.arange(n) * 3 + r * 10
        offsets[r, head : head + n, 1] = np.arange(n) * 3 + r * 10 + 2
    start, end = rng.normal(size=(2, rows, length))
    start[:, 0] = end[:, 0] = 10.0  # [CLS] scores best, but never starts an answer
    span = best_span(start, end, offsets, max_len)
    score, row, i, j = _brute_force(start, end, offsets, max_len)
    assert (span.row, span.start, span.end) == (row, i, j)
    assert span.score == pytest.approx(score)
    assert (span.char_start, span.char_end) == (offsets[row, i, 0], offsets[row, j, 1])


@pytest.fixture(scope="module")
def xquad():
    """(questions, contexts, (answer_start, text)) of the first bundled training passages."""
    _, records = read_task("qa", task_file("qa", "train"))
    out = ([], [], [])
    for record in records[:4]:
        for qa in record["qas"][:3]:
            out[0].append(qa["question"])
            out[1].append(record["context"])
            out[2].append((qa["answers"]["answer_start"][0], qa["answers"]["text"][0]))
    return out


def test_gold_positions_decode_back_to_the_gold_text(wordpiece, xquad):
    """One-hot logits at the features' answer positions decode to the gold answer, though
    each context is cut into several overlapping windows."""
    questions, contexts, answers = xquad
    features = qa_features(load_hf_tokenizer(wordpiece), questions, contexts, 64, 16, answers)
    counts = np.bincount(features.example)
    assert counts.min() > 1 and len(counts) == len(questions)  # every context has windows
    assert (features.token_types[:, 0] == 0).all() and features.tokens.shape[1] == 64
    found = features.start_positions > 0
    assert (np.bincount(features.example[found], minlength=len(questions)) >= 1).all()
    rows = np.arange(len(features))
    start, end = np.full((2, len(features), 64), -10.0)
    start[rows[found], features.start_positions[found]] = 10.0
    end[rows[found], features.end_positions[found]] = 10.0
    decoded = decode_answers(features, start, end, contexts, max_answer_len=30)
    assert decoded == [text for _, text in answers]


def test_answer_outside_its_context_is_one_line(tmp_path):
    """Bad input: the task reader's check (evaluation/tasks.py) names file, line, question."""
    record = {"id": "p", "context": "Tesla died in 1943.", "qas": []}
    record["qas"] = [
        {"id": "q", "question": "When?", "answers": {"text": ["1944"], "answer_start": [14]}}
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(
        JaxlmError, match=r"line 1, question 1: answer '1944' is not in the context"
    ):
        read_task("qa", path)
    assert (
        jaxlm_main(["eval", "--task", "qa", "--data", str(path), "--predictions", str(path)]) == 2
    )


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_qa_loss_matches_numpy_and_falls(wordpiece, xquad):
    import optax

    questions, contexts, answers = xquad
    tokenizer = load_hf_tokenizer(wordpiece)
    f = qa_features(tokenizer, questions, contexts, 64, 32, answers)
    # 8 rows: 6 holding an answer, 2 windows without one (target [CLS])
    here = f.start_positions > 0
    keep = np.concatenate([np.flatnonzero(here)[:6], np.flatnonzero(~here)[:2]])
    f = dataclasses.replace(f, **{k: getattr(f, k)[keep] for k in f.__dataclass_fields__})
    batch = {
        "inputs": f.tokens,
        "token_types": f.token_types,
        "segment_ids": f.mask,
        "start_positions": f.start_positions,
        "end_positions": f.end_positions,
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    m = ModelConfig(
        family="bert",
        head="qa",
        vocab_size=tokenizer.get_piece_size(),
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_len=64,
    )
    model, objective = build_model(m), for_model(m)
    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]

    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt):
        """One Adam step; the loss and logits are the params' before it (one compile)."""
        logits = model.apply(
            {"params": params}, batch["inputs"], batch["token_types"], batch["segment_ids"]
        )
        loss, grads = jax.value_and_grad(lambda p: objective.loss(model, p, batch)[0])(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss, logits

    params, opt, loss0, (start, end) = step(params, tx.init(params))
    rows = np.arange(len(f))
    start, end = np.asarray(start), np.asarray(end)
    want = (
        -0.5
        * (
            _log_softmax(start)[rows, f.start_positions] + _log_softmax(end)[rows, f.end_positions]
        ).mean()
    )
    assert float(loss0) == pytest.approx(want, rel=1e-5)
    for _ in range(STEPS):
        params, opt, loss, _ = step(params, opt)
    assert float(loss) < 0.3 * float(loss0)


def test_eval_task_qa_answers_with_the_best_span(hf_qa, converted_qa, tmp_path):
    """`jaxlm eval MODEL --task qa` on a QA-head BERT decodes spans over windows: its
    answers are those of transformers' logits on the same rows, every span tried."""
    hf_dir = hf_qa[0]
    _, records = read_task("qa")
    data, preds, results = tmp_path / "qa.jsonl", tmp_path / "p.jsonl", tmp_path / "r.json"
    data.write_text(json.dumps(records[0]) + "\n")
    args = ["eval", str(converted_qa), "--task", "qa", "--data", str(data), "--seq-len", "64"]
    args += ["--write-predictions", str(preds), "--json", str(results)]
    assert jaxlm_main(args) == 0
    got = [json.loads(line)["prediction"] for line in preds.read_text().splitlines()]

    qas, context = records[0]["qas"], records[0]["context"]
    f = qa_features(
        load_hf_tokenizer(hf_dir), [q["question"] for q in qas], [context] * len(qas), 64, 32
    )
    model = transformers.BertForQuestionAnswering.from_pretrained(hf_dir).eval()
    start, end = _hf_logits(model, f.tokens.astype(np.int64), f.mask, f.token_types)
    want = []
    for n in range(len(qas)):
        rows = f.example == n
        assert rows.sum() > 1  # the passage takes several windows
        _, r, i, j = _brute_force(start[rows], end[rows], f.offsets[rows], 30)
        want.append(context[f.offsets[rows][r, i, 0] : f.offsets[rows][r, j, 1]])
    assert got == want
    scores = json.loads(results.read_text())
    assert scores["task"] == "qa" and scores["examples"] == len(qas)
    assert 0 <= scores["exact_match"] <= scores["f1"] <= 100
