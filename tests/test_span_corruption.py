"""T5's span corruption: the noise statistics of the T5 paper, exact reconstruction of
the text from inputs and targets, sentinel order, exact resume, the task's selection by
data kind, and a short t5-tiny pretraining run on plain text whose loss falls."""

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data import span_corruption as sc
from jaxlm.data import tasks
from jaxlm.data.pipeline import make_dataset, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import JaxlmError
from jaxlm.train.metrics import read_metrics

from .conftest import CORPUS, REPO

SEQ_LEN, TARGET_LEN = 48, 16
CHUNK = 52  # T5's random_spans_helper for 48 inputs: 44 kept + 3 sentinels + EOS


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory):
    docs, _ = split_documents(read_documents(str(CORPUS)), 0.1)
    docs = docs[:600]
    path = tmp_path_factory.mktemp("tok") / "t5.model"
    tok = load_tokenizer(train_tokenizer(docs, path, 400, extra_symbols=sc.sentinel_pieces(3)))
    return docs, tok


def _iter(docs, tok, **kw):
    kw = dict(seq_len=SEQ_LEN, batch_size=8, seed=3, make_stream=_stream) | kw
    return iter(make_dataset(docs, tok, **kw))


def _stream(*args, **kw):
    return sc.span_corruption_stream(*args, target_len=TARGET_LEN, **kw)


def _runs(mask):
    """Lengths of the runs of True in a boolean vector (independent of the code's)."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_chunk_length_is_t5s_random_spans_helper():
    # T5's published pairs: 512 inputs <- 568 tokens -> 114 targets; and ours for 48.
    assert sc.tokens_length(512, 512, 0.15, 3.0) == 568
    assert sc.corrupted_lengths(568, 0.15, 3.0) == (512, 114)
    assert sc.tokens_length(SEQ_LEN, TARGET_LEN, 0.15, 3.0) == CHUNK
    assert sc.corrupted_lengths(CHUNK, 0.15, 3.0) == (48, 12)


def test_noise_fraction_and_mean_span_length():
    """Over 2000 draws at random lengths: 15% noise (+-0.5 points) in spans of mean
    length 3 (+-0.1); spans vary in length and fall everywhere but the first token."""
    rng = np.random.default_rng(0)
    noise = spans = tokens = 0
    lengths = []
    at = np.zeros(568)
    for _ in range(2000):
        n = int(rng.integers(100, 1000))
        mask = sc.random_spans_noise_mask(n, 0.15, 3.0, rng)
        assert mask.shape == (n,) and mask.dtype == bool
        runs = _runs(mask)
        noise, spans, tokens = noise + mask.sum(), spans + len(runs), tokens + n
        lengths.extend(runs)
        at += sc.random_spans_noise_mask(568, 0.15, 3.0, rng)
    assert abs(noise / tokens - 0.15) < 0.005, noise / tokens
    assert abs(noise / spans - 3.0) < 0.1, noise / spans
    lengths = np.asarray(lengths)
    assert lengths.min() == 1 and lengths.max() >= 10 and 1.5 < lengths.std() < 3.5
    # T5 (random_roll off, its default) starts with kept tokens and ends with noise.
    assert at[0] == 0 and at[-1] == 2000
    np.testing.assert_allclose(at[10:-10] / 2000, 0.15, atol=0.04)


def _reconstruct(inputs, targets, sentinels, eos):
    """The original tokens: each sentinel of the inputs replaced by what follows it in
    the targets, up to the next sentinel or EOS."""
    spans, current = {}, None
    for t in targets:
        if t == eos:
            break
        if t in sentinels:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs:
        if t == eos:
            break
        out.extend(spans.pop(int(t)) if t in sentinels else [int(t)])
    assert not spans, "a target span had no sentinel in the inputs"
    return out


def test_inputs_and_targets_give_back_the_text_with_ordered_sentinels(t5_data):
    docs, tok = t5_data
    sentinels = [tok.piece_to_id(f"<extra_id_{k}>") for k in range(3)]
    assert len(set(sentinels)) == 3 and sentinels == sorted(sentinels, reverse=True)
    assert all(tok.id_to_piece(s) == f"<extra_id_{k}>" for k, s in enumerate(sentinels))
    newline = tok.piece_to_id("\n")
    corpus = []
    for i, doc in enumerate(docs):
        corpus += ([newline] if i else []) + tok.encode(doc)

    it = _iter(docs, tok, num_streams=1, shuffle=False)
    rebuilt, noise, kept = [], 0, 0
    for _ in range(20):
        b = next(it)
        assert b["inputs"].shape == (8, SEQ_LEN) and b["targets"].shape == (8, TARGET_LEN)
        for row in range(8):
            src, tgt = b["inputs"][row], b["targets"][row]
            n_src, n_tgt = b["input_mask"][row].sum(), b["target_mask"][row].sum()
            assert src[n_src - 1] == tgt[n_tgt - 1] == tok.eos_id()
            assert (src[n_src:] == tok.pad_id()).all() and (tgt[n_tgt:] == tok.pad_id()).all()
            np.testing.assert_array_equal(b["decoder_inputs"][row, 0], tok.bos_id())
            np.testing.assert_array_equal(b["decoder_inputs"][row, 1:n_tgt], tgt[: n_tgt - 1])
            # Sentinels: <extra_id_0>, 1, 2 once each, in order, on both sides.
            in_src = [t for t in src if t in sentinels]
            in_tgt = [t for t in tgt if t in sentinels]
            assert in_src == in_tgt == sentinels[: len(in_src)] and tgt[0] == sentinels[0]
            chunk = _reconstruct(src, tgt, sentinels, tok.eos_id())
            assert len(chunk) == CHUNK
            rebuilt += chunk
            noise += n_tgt - 1 - len(in_tgt)
            kept += n_src - 1 - len(in_src)
    assert rebuilt == corpus[: len(rebuilt)]  # the chunks, in order, are the text
    assert noise / (noise + kept) == pytest.approx(8 / CHUNK)  # round(0.15 * 52) = 8


def test_stream_resumes_exactly(t5_data):
    docs, tok = t5_data
    it = _iter(docs, tok, num_streams=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    fresh = _iter(docs, tok, num_streams=2)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    other_seed = next(_iter(docs, tok, num_streams=2, seed=4))
    assert not np.array_equal(other_seed["inputs"], next(_iter(docs, tok, num_streams=2))["inputs"])


def test_text_pretrains_and_pairs_stay_seq2seq(tmp_path):
    t5 = load_config(REPO / "configs" / "t5-tiny.yaml")
    assert tasks._task(t5) == "seq2seq"  # the bundled JSONL pairs
    assert tasks.tokenizer_symbols(t5) == ()
    text = t5.replace(data={"path": str(CORPUS)})
    assert tasks._task(text) == "span_corruption"
    assert tasks.tokenizer_symbols(text) == ("<extra_id_2>", "<extra_id_1>", "<extra_id_0>")
    assert tasks._task(t5.replace(data={"format": "text"})) == "span_corruption"
    gpt2 = load_config(REPO / "configs" / "gpt2-tiny.yaml").replace(data={"path": str(CORPUS)})
    assert tasks._task(gpt2) == "packed"


def test_a_tokenizer_without_sentinels_is_refused(t5_data, tmp_path):
    docs, _ = t5_data
    plain = load_tokenizer(train_tokenizer(docs[:300], tmp_path / "plain.model", 400))
    text = load_config(REPO / "configs" / "t5-tiny.yaml").replace(data={"path": str(CORPUS)})
    with pytest.raises(JaxlmError, match="no sentinel piece '<extra_id_0>'"):
        tasks.stream_maker(text, plain)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.noise_density=1.5", "config key 'data.noise_density': must be between 0 and 1"),
        ("data.mean_noise_span_length=0.5", "'data.mean_noise_span_length': must be >= 1"),
        ("data.target_len=2", "data.target_len: 2 decoder tokens cannot hold the targets"),
    ],
)
def test_bad_span_settings_are_one_line(override, message, tmp_path, capsys):
    args = ["train", "configs/t5-tiny.yaml", f"data.path={CORPUS}", override]
    code = main([*args, "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_t5_tiny_pretrains_on_plain_text(tmp_path, capsys):
    """`jaxlm train configs/t5-tiny.yaml data.path=...txt`, one layer each side and 30
    steps: span corruption is chosen (the run's tokenizer has the sentinels) and the
    loss falls from about 7 (measured 4.7 at step 30)."""
    run_dir = tmp_path / "run"
    args = ["train", "configs/t5-tiny.yaml", f"data.path={CORPUS}", "--run-dir", str(run_dir)]
    args += ["model.d_model=32", "model.n_layers=1", "model.n_decoder_layers=1"]
    args += ["model.n_heads=2", "model.d_ff=64", "tokenizer.vocab_size=400", "optim.lr=1e-2"]
    args += ["train.steps=30", "train.batch_size=16", "data.target_len=16", "--no-progress"]
    args += ["train.log_every=1", "train.eval_every=1000", "train.eval_batches=2"]
    args += ["checkpoint.every=1000", "train.tensorboard=false"]
    assert main(args) == 0
    assert (
        "span corruption: chunks of 52 tokens, 8 hidden in 3 spans -> 48 of 48 encoder "
        "tokens, 12 of 16 decoder tokens" in capsys.readouterr().out
    )
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 1 and last["step"] == 30
    assert last["eval_loss"] < first["loss"] - 1.5, (first, last)
    tok = load_tokenizer(run_dir / "tokenizer.model")
    assert [tok.id_to_piece(tok.piece_to_id(f"<extra_id_{k}>")) for k in range(3)] == [
        f"<extra_id_{k}>" for k in range(3)
    ]
