"""The training loop end to end: learning, resuming, and what a run directory holds."""

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data.pipeline import eval_batches, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.train.loop import train
from jaxlm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from .conftest import TINY

    config = load_config(
        None,
        [
            *TINY,
            "name=learn",
            "train.steps=120",
            "train.eval_every=60",
            "train.log_every=20",
            "checkpoint.every=40",
        ],
    )
    run_dir = tmp_path_factory.mktemp("learn")
    return train(config, run_dir, progress=False), run_dir


def _unigram_entropy(config, run_dir) -> float:
    """Cross-entropy of the best context-free predictor on the eval tokens."""
    docs = read_documents(config.data.path)
    _, held_out = split_documents(docs, config.data.eval_fraction)
    batches = eval_batches(
        held_out,
        load_tokenizer(run_dir / "tokenizer.model"),
        seq_len=config.train.seq_len,
        batch_size=config.train.batch_size,
        max_batches=config.train.eval_batches,
    )
    targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_training_beats_a_context_free_model(trained):
    result, run_dir = trained
    final = result.history[-1]
    assert final["step"] == 120
    uniform = np.log(result.config.model.vocab_size)  # an untrained model's loss
    unigram = _unigram_entropy(result.config, run_dir)
    assert unigram < uniform - 0.5
    # Only a model that uses the context gets well below the unigram entropy.
    assert final["eval_loss"] < unigram - 0.5, (final["eval_loss"], unigram)
    assert result.history[0]["loss"] > final["loss"]


def test_run_directory_contents(trained):
    result, run_dir = trained
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100, 120]
    for r in records:
        assert {"step", "loss", "tokens_per_sec", "perplexity", "grad_norm", "lr", "mfu"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-6)
    assert "eval_loss" in records[2] and "eval_loss" in records[5]
    saved = load_config(run_dir / "config.yaml")
    assert saved == result.config and saved.model.vocab_size == 512
    assert (run_dir / "tokenizer.model").is_file()
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [40, 80, 120]  # every 40, keep 3


def test_resume_is_exact(tiny_config, tmp_path):
    config = tiny_config.replace(train={"steps": 12})  # stop_at=6: one step past a save
    straight = train(config, tmp_path / "straight", progress=False)
    first = train(config, tmp_path / "resumed", progress=False, stop_at=6)
    second = train(config, tmp_path / "resumed", progress=False)
    assert [r["step"] for r in first.history] == list(range(1, 7))
    assert [r["step"] for r in second.history] == list(range(7, 13))
    losses = [r["loss"] for r in first.history + second.history]
    assert losses == [r["loss"] for r in straight.history]
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        jax.device_get(second.state.params),
        jax.device_get(straight.state.params),
    )
    assert int(second.state.step) == 12
