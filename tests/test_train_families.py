"""The decoder families from the CLI with a loss threshold (bert and t5 have theirs in
test_bert.py and test_t5.py): a shortened llama-tiny run, since gpt2's CLI run
(test_cli.py) and its learning threshold (test_train.py) are covered already."""

import subprocess
import sys

import numpy as np

from jaxlm.train.metrics import read_metrics

from .conftest import REPO, subprocess_env


def jaxlm(*args: str) -> subprocess.CompletedProcess:
    """`jaxlm ARGS` as a user on a laptop runs it: one CPU device (the tests' 8 emulated
    devices would only slow these tiny models down)."""
    env = subprocess_env(devices=1, optimized=True)  # learning runs: hundreds of steps
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


LLAMA_SHORT = [
    "model.n_layers=2",
    "tokenizer.vocab_size=512",
    "train.steps=40",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.eval_every=40",
    "train.eval_batches=4",
    "train.log_every=1",
    "train.sample_tokens=0",
    "checkpoint.every=40",
]
LLAMA_LOSS_THRESHOLD = 4.8  # from ln(512) = 6.24 untrained; 40 steps reach 4.41 (measured)


def test_jaxlm_train_llama_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    out = jaxlm("train", "configs/llama-tiny.yaml", *LLAMA_SHORT, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 1 and first["loss"] > np.log(512) - 0.3 and last["step"] == 40
    assert last["eval_loss"] < LLAMA_LOSS_THRESHOLD, last
