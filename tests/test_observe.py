"""Watching runs: TensorBoard events, profiles and plots of real tiny runs."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.errors import JaxlmError
from jaxlm.train.loop import train
from jaxlm.train.metrics import read_metrics

from .conftest import CORPUS, REPO, TINY


def _run(tmp_path_factory, name: str, extra: list[str]):
    config = load_config(
        None, [*TINY, f"name={name}", "train.steps=4", "train.tensorboard=true", *extra]
    )
    run_dir = tmp_path_factory.mktemp(name)
    return train(config, run_dir, progress=False), run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs of the same shapes (one compile): the first profiles steps 2..3,
    evaluates at step 2 and 4 and writes a sample at the end."""
    first = _run(
        tmp_path_factory,
        "watched",
        ["train.eval_every=2", "train.profile_steps=[2,3]", "train.sample_tokens=8"],
    )
    second = _run(tmp_path_factory, "other", ["optim.lr=1e-3"])
    return first, second


def _events(directory):
    """(tag, step, value-or-text) of every summary in the event files, read with the
    TFRecord framing (length, crc, data, crc) and tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.append((value.tag, event.step, value.simple_value))
                else:
                    text = value.tensor.string_val[0].decode()
                    out.append((value.tag, event.step, text))
    return out


def test_tensorboard_events_hold_every_metric(runs):
    (result, run_dir), _ = runs
    events = _events(run_dir / "tensorboard")
    scalars = {(tag, step): v for tag, step, v in events if not isinstance(v, str)}
    texts = {tag.split("/")[0]: (step, v) for tag, step, v in events if isinstance(v, str)}
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    expected = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                expected[(tag, r["step"])] = value
    assert ("eval/loss", 2) in expected and ("eval/loss", 4) in expected
    assert scalars.keys() == expected.keys()
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # stored as float32
    assert "name: watched" in texts["config"][1]
    assert texts["sample"][0] == 4 and result.sample.splitlines()[0] in texts["sample"][1]


def test_profile_window_writes_a_trace(runs):
    (_, run_dir), (_, other_dir) = runs
    traces = list((run_dir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert not (other_dir / "profile").exists()


def test_plot_overlays_both_runs(runs, tmp_path):
    from jaxlm.cli import main
    from jaxlm.observe.plot import plot_runs

    dirs = [str(run_dir) for _, run_dir in runs]
    out = tmp_path / "runs.png"
    fig = plot_runs(dirs, out)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1000, 700)  # 10 x 7 inches at 100 dpi
    panels = {ax.get_title(): ax for ax in fig.axes}
    for title, key in [
        ("train loss", "loss"),
        ("eval loss", "eval_loss"),
        ("learning rate", "lr"),
        ("tokens/s", "tokens_per_sec"),
    ]:
        lines = panels[title].get_lines()
        assert len(lines) == 2, title
        for line, run_dir in zip(lines, dirs, strict=True):
            records = [r for r in read_metrics(f"{run_dir}/metrics.jsonl") if key in r]
            assert list(line.get_xdata()) == [r["step"] for r in records]
            assert list(line.get_ydata()) == [r[key] for r in records]
            assert line.get_label() == run_dir.rstrip("/").split("/")[-1]
    assert main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl there


def _log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_score_decoder_tokens(runs, capsys):
    from jaxlm.cli import main
    from jaxlm.observe.score import score
    from jaxlm.pretrained import load_pretrained

    (_, run_dir), _ = runs
    pretrained = load_pretrained(run_dir)
    text = "ROMEO: But soft, what light"
    result = score(pretrained, text)
    ids = [pretrained.tokenizer.bos_id(), *pretrained.tokenizer.encode(text)]
    logits = pretrained.model.apply({"params": pretrained.params}, np.asarray([ids]))[0]
    expected = _log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]
    got = [t["logprob"] for t in result["tokens"]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    full = _log_softmax(logits)
    # A rank counts the vocabulary's logprobs above the token's, bounded within 1e-5,
    # so a near-tie computed in another program order can't flip it.
    fewest = [1 + sum(full[i] > full[i, t] + 1e-5) for i, t in enumerate(ids[1:])]
    most = [1 + sum(full[i] > full[i, t] - 1e-5) for i, t in enumerate(ids[1:])]
    got_ranks = [t["rank"] for t in result["tokens"]]
    assert all(lo <= r <= hi for lo, r, hi in zip(fewest, got_ranks, most, strict=True))
    assert [t["id"] for t in result["tokens"]] == ids[1:]
    assert result["perplexity"] == pytest.approx(np.exp(-expected.mean()), rel=1e-4)
    assert main(["score", str(run_dir), "--text", text, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0]["id"] == ids[1]
    assert main(["score", str(run_dir / "metrics.jsonl"), "--text", text]) == 2


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A randomly initialised tiny BERT saved as a model directory, with a tokenizer
    that has the <mask> piece."""
    from jaxlm.data.tokenizer import cached_tokenizer
    from jaxlm.models import build_model
    from jaxlm.pretrained import save_pretrained

    directory = tmp_path_factory.mktemp("bert")
    lines = CORPUS.read_text().splitlines()[:3000]
    docs = ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    cached_tokenizer(docs, directory / "tokenizer.model", 384, "bpe", ("<mask>",))
    config = load_config(
        REPO / "configs" / "bert-tiny.yaml",
        ["model.vocab_size=384", "model.n_layers=1", "model.d_ff=64"],
    )
    model = build_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    save_pretrained(directory, config, params)
    return directory


def test_score_bert_masks(bert_dir):
    from jaxlm.observe.score import score
    from jaxlm.pretrained import load_pretrained

    pretrained = load_pretrained(bert_dir)
    tok = pretrained.tokenizer
    result = score(pretrained, "the king <mask> to the <mask>", top_k=3)
    mask = tok.piece_to_id("<mask>")
    ids = [tok.bos_id(), *tok.encode("the king"), mask, *tok.encode(" to the"), mask]
    ids.append(tok.eos_id())
    logits = pretrained.model.apply({"params": pretrained.params}, np.asarray([ids]))[0][0]
    probs = np.exp(_log_softmax(logits))
    positions = [i for i, t in enumerate(ids) if t == mask]
    assert [m["position"] for m in result["masks"]] == positions
    for m in result["masks"]:
        row = probs[m["position"]]
        top = sorted(range(len(row)), key=lambda t: -row[t])[:3]
        assert [p["id"] for p in m["predictions"]] == top
        np.testing.assert_allclose([p["prob"] for p in m["predictions"]], row[top], rtol=1e-4)
    with pytest.raises(JaxlmError, match="no <mask>"):
        score(pretrained, "no mask here")
