"""`jaxlm train` with BERT's QA head (model.head=qa): fine-tuning from an MLM + NSP run
loads its encoder (compared with an orbax restore of the source checkpoint) and starts
the QA head fresh; the loss falls on a few passages; `jaxlm eval --task qa` on the run
scores its written predictions as SQuAD's metric does; sentencepiece offsets against
decoding piece by piece; the data stream resumes exactly; bad input is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm

from jaxlm.cli import main as jaxlm_main
from jaxlm.config import load_config
from jaxlm.data.extractive_qa import encode_with_offsets, piece_offsets, qa_stream, training_rows
from jaxlm.data.mlm import MASK_PIECE
from jaxlm.data.pipeline import make_dataset
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.evaluation.squad import squad_scores
from jaxlm.evaluation.tasks import read_task, task_file
from jaxlm.model_dir import save_pretrained
from jaxlm.models import build_model
from jaxlm.train.loop import train

from .conftest import REPO

QA_CONFIG = REPO / "configs" / "bert-qa-tiny.yaml"
BODY = [  # the body both runs share: one layer of width 32
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_len=64",
]
QA_STEPS = 40


def _flat(tree) -> dict[str, np.ndarray]:
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in pairs}


@pytest.fixture(scope="module")
def passages(tmp_path_factory):
    """(a JSONL file of 4 training passages, a .txt corpus of the same text)."""
    root = tmp_path_factory.mktemp("qa_data")
    _, records = read_task("qa", task_file("qa", "train"))
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(r["context"] for r in records[:40]))
    return data, corpus


@pytest.fixture(scope="module")
def mlm_run(passages, tmp_path_factory):
    """An MLM + NSP BERT's model directory (what `jaxlm convert` or a run's export
    writes: config.yaml, params/, tokenizer.model with `<mask>`), its weights a random
    init: the source a QA run starts from, without compiling a pretraining step."""
    run_dir = tmp_path_factory.mktemp("mlm") / "model"
    texts = passages[1].read_text().split("\n\n")
    train_tokenizer(texts, run_dir / "tokenizer.model", 512, extra_symbols=[MASK_PIECE])
    vocab = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer.model"))
    config = load_config(REPO / "configs" / "bert-tiny.yaml", [*BODY, "tokenizer.vocab_size=512"])
    config = config.replace(model={"vocab_size": vocab.get_piece_size()})
    model = build_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(7), jnp.zeros((1, 8), jnp.int32))["params"]
    save_pretrained(run_dir, config, params)
    return run_dir


def _qa_args(passages, mlm_run, *extra: str) -> list[str]:
    return [
        "train",
        str(QA_CONFIG),
        *BODY,
        f"data.path={passages[0]}",
        f"tokenizer.path={mlm_run and mlm_run / 'tokenizer.model'}",
        "data.eval_fraction=0.25",
        "train.batch_size=8",
        "train.seq_len=64",
        "data.doc_stride=32",
        "train.log_every=1",
        "train.eval_batches=1",
        *extra,
    ]


def test_init_from_an_mlm_run_loads_its_encoder_and_starts_the_qa_head(
    passages, mlm_run, tmp_path, capsys
):
    """At step 0 every encoder parameter is the source checkpoint's (read back by orbax
    alone), the QA head is there and new, the MLM/NSP heads and pooler are gone, and
    one line says so."""
    args = _qa_args(passages, mlm_run, f"init_from={mlm_run}")[2:]
    config = load_config(QA_CONFIG, args)
    state = train(config, tmp_path / "qa", progress=False, stop_at=0).state
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("init_from")]
    assert line == [
        f"init_from {mlm_run}: loaded encoder (head mlm_nsp -> qa); freshly initialised: "
        "qa_outputs; dropped: encoder/pooler, mlm, nsp"
    ]

    with ocp.PyTreeCheckpointer() as ckptr:
        source = _flat(ckptr.restore(mlm_run / "params"))
    mine = _flat(state.params)
    encoder = [k for k in source if k.startswith("encoder/") and "pooler" not in k]
    assert len(encoder) > 10 and all(k in mine for k in encoder)
    for k in encoder:
        np.testing.assert_array_equal(mine[k], source[k], err_msg=k)
    assert {k for k in mine if not k.startswith("encoder/")} == {
        "qa_outputs/kernel",
        "qa_outputs/bias",
    }
    assert not any(k.startswith(("mlm/", "nsp/", "encoder/pooler")) for k in mine)


def test_init_from_a_hf_bert_for_pretraining_loads_its_encoder(passages, tmp_path, capsys):
    """`init_from=hf:DIR` with a transformers BertForPreTraining into the QA head: the
    encoder holds the torch weights, the QA head is new, one line names the groups."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm.data.hf_tokenizer import load_hf_tokenizer

    from .test_hf import _wordpiece_tokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    _wordpiece_tokenizer(hf_dir)
    config = transformers.BertConfig(
        vocab_size=load_hf_tokenizer(hf_dir).get_piece_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        architectures=["BertForPreTraining"],
    )
    torch.manual_seed(0)
    transformers.BertForPreTraining(config).save_pretrained(hf_dir)
    want = {
        k: v.numpy()
        for k, v in transformers.BertForPreTraining.from_pretrained(hf_dir).state_dict().items()
    }
    args = _qa_args(passages, None, f"init_from=hf:{hf_dir}")[2:]
    qa = load_config(QA_CONFIG, [a for a in args if not a.startswith("tokenizer.path")])
    state = train(qa, tmp_path / "qa", progress=False, stop_at=0).state
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("init_from")]
    assert line == [
        f"init_from {hf_dir}: loaded encoder (head mlm_nsp -> qa); freshly initialised: "
        "qa_outputs; dropped: encoder/pooler, mlm, nsp"
    ]
    mine = _flat(state.params)
    emb = "bert.embeddings."
    pairs = {
        "encoder/embed/embedding": want[emb + "word_embeddings.weight"],
        "encoder/pos_embed/embedding": want[emb + "position_embeddings.weight"],
        "encoder/ln_embed/scale": want[emb + "LayerNorm.weight"],
        "encoder/layers/mlp/fc_in/bias": want["bert.encoder.layer.0.intermediate.dense.bias"][None],
    }
    for k, v in pairs.items():
        np.testing.assert_allclose(mine[k], v, rtol=0, atol=0, err_msg=k)
    assert {k for k in mine if not k.startswith("encoder/")} == {
        "qa_outputs/kernel",
        "qa_outputs/bias",
    }


@pytest.fixture(scope="module")
def qa_run(passages, mlm_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qa") / "run"
    extra = [f"init_from={mlm_run}", f"train.steps={QA_STEPS}", "optim.lr=3e-3"]
    extra += ["optim.warmup_steps=5", f"train.eval_every={QA_STEPS}"]
    args = _qa_args(passages, mlm_run, *extra, "--run-dir", str(run_dir), "--no-progress")
    assert jaxlm_main(args) == 0
    return run_dir


def test_qa_loss_falls_and_eval_scores_the_runs_predictions(passages, qa_run, tmp_path):
    """The start/end loss on 3 passages falls well below its start; `jaxlm eval RUN
    --task qa` prints the EM/F1 that SQuAD's metric gives its written predictions;
    `jaxlm eval RUN` gives the held-out loss training logged."""
    records = [json.loads(x) for x in (qa_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == QA_STEPS
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert "eval_loss" in records[-1]

    preds, results = tmp_path / "p.jsonl", tmp_path / "r.json"
    args = ["eval", str(qa_run), "--task", "qa", "--data", str(passages[0])]
    assert jaxlm_main([*args, "--write-predictions", str(preds), "--json", str(results)]) == 0
    examples, _ = read_task("qa", passages[0])
    got = {json.loads(x)["id"]: json.loads(x)["prediction"] for x in preds.read_text().splitlines()}
    assert sorted(got) == sorted(e.id for e in examples)
    want = squad_scores([got[e.id] for e in examples], [list(e.references) for e in examples])
    scores = json.loads(results.read_text())
    assert scores["exact_match"] == pytest.approx(want["exact_match"])
    assert scores["f1"] == pytest.approx(want["f1"])

    # `jaxlm eval RUN` scores the held-out rows as training's eval did (its first batch)
    args = ["eval", str(qa_run), "--batch-size", "8", "--max-batches", "1"]
    assert jaxlm_main([*args, "--json", str(results)]) == 0
    held_out = json.loads(results.read_text())
    assert held_out["rows"] == 8
    assert held_out["loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-5)


TEXT = "Zebra café: 6½ 日本 crème brûlée  costs\n€5, naïve."


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A jaxlm sentencepiece model (byte fallback) that has é and û but not 日 or €."""
    path = tmp_path_factory.mktemp("spm") / "t.model"
    docs = ["The café served crème brûlée, 6½ of them; naïve façade."] * 20
    train_tokenizer([*docs, "a quick brown fox jumps over the lazy dog"] * 5, path, 300)
    return spm.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_offsets_are_characters(spm_tokenizer):
    """Each piece's span against a slow reference: the length of the text decoded from
    the pieces up to it (its UTF-8 spans would be off after é; a byte-fallback
    character's partial bytes decode to U+FFFD and count nothing)."""
    ids, spans = piece_offsets(spm_tokenizer, TEXT)
    assert ids == spm_tokenizer.encode(TEXT)
    want, end = [], 0
    for i in range(len(ids)):
        start, end = end, len(spm_tokenizer.decode(ids[: i + 1]).rstrip("\ufffd"))
        want.append((start, end))
    assert spans == want
    assert "".join(TEXT[a:b] for a, b in spans) == TEXT
    assert any(b - a == 1 and len(TEXT[a:b].encode()) > 1 for a, b in spans)  # é, ½
    _, trimmed = encode_with_offsets(spm_tokenizer, TEXT)
    for (a, b), (ta, tb) in zip(spans, trimmed, strict=True):
        assert (ta, tb) == (a + len(TEXT[a:b]) - len(TEXT[a:b].lstrip()), b)


def test_qa_stream_resumes_exactly(passages, spm_tokenizer):
    """The training stream's checkpointed position gives the same next batches."""
    _, records = read_task("qa", passages[0])
    rows = training_rows(records, spm_tokenizer, 64, 32)

    def stream():
        return iter(
            make_dataset(rows, spm_tokenizer, seq_len=64, batch_size=4, seed=1,
                         num_streams=2, make_stream=qa_stream)
        )  # fmt: skip

    it = stream()
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    again = stream()
    again.set_state(state)
    for batch in want:
        got = next(again)
        assert set(got) == {
            "inputs",
            "token_types",
            "segment_ids",
            "start_positions",
            "end_positions",
        }
        for k in batch:
            np.testing.assert_array_equal(got[k], batch[k])


def test_bad_answer_and_encoder_mismatch_are_one_line(passages, mlm_run, tmp_path, capsys):
    """An answer not at its answer_start names the file and line; an init_from run
    whose encoder differs names the first differing parameter; both exit 2."""
    record = json.loads(passages[0].read_text().splitlines()[0])
    record["qas"][0]["answers"]["answer_start"][0] += 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    args = _qa_args(passages, mlm_run, f"data.path={bad}", "--run-dir", str(tmp_path / "a"))
    assert jaxlm_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}, line 1, question 1: answer" in err[0]

    args = _qa_args(passages, mlm_run, f"init_from={mlm_run}", "model.d_ff=128")
    assert jaxlm_main([*args, "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "parameter encoder/layers/mlp/fc_in/bias has shape (1, 64) there, (1, 128)" in err[0]
    )
