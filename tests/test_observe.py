"""Watching runs: TensorBoard events, profiles and plots of real tiny runs."""

from __future__ import annotations

import struct

import pytest

from jaxlm.config import load_config
from jaxlm.train.loop import train
from jaxlm.train.metrics import read_metrics

from .conftest import TINY


def _run(tmp_path_factory, name: str, extra: list[str]):
    config = load_config(None, [*TINY, f"name={name}", "train.steps=4", *extra])
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
