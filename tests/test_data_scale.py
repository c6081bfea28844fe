"""Corpora larger than memory (issue #21): a training process's peak memory and start-up
time do not grow with the corpus, and a run on the big corpus resumes exactly.

Two generated text corpora 10x apart, the big one larger than a training process's
whole peak memory. Each is indexed once here (as a first run would), then trained a
few steps by a real `jaxlm train` process, whose peak RSS (VmHWM, polled) and time to its
first step are measured; the process is killed while saving its last checkpoint and
the run resumed in this process, which must repeat the killed run's losses bit for
bit.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.data.sources import read_documents
from jaxlm.train.faults import KILL_ENV

from .conftest import REPO, subprocess_env

SMALL, BIG = 100 << 20, 1000 << 20
STEPS, EVERY = 6, 3
ARGS = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_len=32",
    "tokenizer.vocab_size=320",
    "tokenizer.sample_docs=64",
    "train.batch_size=8",
    "train.seq_len=32",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    f"checkpoint.every={EVERY}",
    "train.tensorboard=false",
]


def train_args(corpus: Path, run_dir: Path) -> list[str]:
    args = ["train", "configs/shakespeare.yaml", f"data.path={corpus}", *ARGS]
    return [*args, "--run-dir", str(run_dir), "--no-progress"]


def write_corpus(path: Path, size: int, seed: int) -> None:
    """Paragraphs (about 500 bytes) of random lowercase words, blank lines between:
    eight distinct 8 MB blocks, cycled, so writing is what it costs."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(8):
        draw = rng.integers(0, 3000, size=8 << 20, dtype=np.uint16)
        block = (97 + draw % 26).astype(np.uint8)
        block[draw < 500] = 32
        cuts = np.flatnonzero(draw[:-2] == 0)
        block[cuts], block[cuts + 1] = 10, 10
        block[-1] = 10
        blocks.append(block.tobytes())
    with path.open("wb") as f:
        for i, start in enumerate(range(0, size, 8 << 20)):
            f.write(blocks[i % len(blocks)][: size - start])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    paths = {"small": root / "small.txt", "big": root / "big.txt"}
    write_corpus(paths["small"], SMALL, 0)
    write_corpus(paths["big"], BIG, 1)
    for path in paths.values():
        read_documents(str(path))  # the one-time index, found cached by the runs
    yield paths
    for path in paths.values():  # 1.1 GB: not left for pytest's kept tmp dirs
        path.unlink()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def measured_run(corpus: Path, run_dir: Path) -> dict:
    """`jaxlm train` in a child killed as it saves step STEPS: its peak RSS (bytes, its
    own VmHWM) and seconds from launch to its first step's log."""
    cmd = [sys.executable, "-m", "jaxlm.cli", *train_args(corpus, run_dir)]
    env = subprocess_env(
        **{KILL_ENV: str(STEPS), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    )
    metrics = run_dir / "metrics.jsonl"
    with (run_dir.parent / f"{run_dir.name}.err").open("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        first_step, peak = None, 0
        while True:
            # The child's own peak (VmHWM): wait4's ru_maxrss would start at this pytest
            # process's resident size, which Linux carries over into a forked child.
            peak = max(peak, _peak_rss(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if first_step is None and metrics.is_file() and metrics.stat().st_size:
                first_step = time.perf_counter() - start
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == -9, stderr  # SIGKILLed while saving step STEPS
    assert first_step is not None, stderr
    return {"rss": peak, "startup": first_step}


def _peak_rss(pid: int) -> int:
    """Bytes of a live process's peak resident set (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory):
    """The measured runs, after an uninterrupted one here on the small corpus: its
    compiled step is in the session's compilation cache, so neither child compiles
    (compiling takes more memory than anything the data does) and the small run's
    losses are the reference for the resumed ones."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(REPO)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache it, however fast
    try:
        assert main(train_args(corpora["small"], root / "reference")) == 0
    finally:
        os.chdir(cwd)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    out = {"reference": root / "reference"}
    for name, corpus in corpora.items():
        run_dir = root / name
        run_dir.mkdir()
        out[name] = measured_run(corpus, run_dir) | {"dir": run_dir, "corpus": corpus}
    print({k: (round(out[k]["rss"] / 2**20), round(out[k]["startup"], 1)) for k in corpora})
    return out


def test_memory_and_startup_do_not_grow_with_the_corpus(runs):
    small, big = runs["small"], runs["big"]
    assert big["rss"] < BIG  # the process never held the corpus
    assert big["rss"] < small["rss"] + (64 << 20)
    assert big["startup"] < 2 * small["startup"] + 10  # 10x the records, not 10x the time
    # The data position in the checkpoint: the same few numbers whatever the corpus.
    state = [r["dir"] / f"checkpoints/{EVERY}/data/stream_0-of-1.json" for r in (small, big)]
    assert state[1].stat().st_size <= state[0].stat().st_size + 8


@pytest.mark.parametrize("name", ["small", "big"])
def test_killed_run_resumes_exactly(runs, name, monkeypatch, capsys):
    run_dir, corpus = runs[name]["dir"], runs[name]["corpus"]
    before = losses(run_dir)
    assert [s for s, _ in before] == list(range(1, STEPS + 1))
    monkeypatch.chdir(REPO)
    code = main(train_args(corpus, run_dir))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"resumed from {run_dir}/checkpoints/{EVERY}" in out.out
    after = losses(run_dir)[STEPS:]
    assert after == before[EVERY:]  # steps 4..6 again, bit for bit
    if name == "small":  # and the same as a run never interrupted
        assert before == losses(runs["reference"])
