"""The decoder families from the CLI with a loss threshold (bert and t5 have theirs in
test_bert.py and test_t5.py): the llama-tiny preset, shortened, since gpt2's CLI run
(test_cli.py) and its learning threshold (test_train.py) are covered already."""

import subprocess
import sys

import numpy as np

from jaxlm.config import load_config
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


# configs/llama-tiny.yaml as shipped (4 layers, vocab 1024), on shorter batches and runs.
LLAMA_SHORT = [
    "train.steps=60",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.eval_every=60",
    "train.eval_batches=4",
    "train.log_every=1",
    "train.sample_tokens=0",
    "optim.warmup_steps=10",
    "checkpoint.every=60",
]
LLAMA_LOSS_THRESHOLD = 5.5  # from ln(1024) = 6.93 untrained; 60 steps reach 5.17 (measured)


def test_jaxlm_train_llama_tiny_preset_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    out = jaxlm("train", "configs/llama-tiny.yaml", *LLAMA_SHORT, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    config = load_config(run_dir / "config.yaml")
    assert config.model.family == "llama" and config.model.kv_heads == 2
    assert config.model.vocab_size == 1024
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 1 and first["loss"] > np.log(1024) - 0.3 and last["step"] == 60
    assert last["eval_loss"] < LLAMA_LOSS_THRESHOLD < first["loss"] - 1.0, (first, last)
