"""Preemption, crashes, corrupt checkpoints and NaNs, driven through `jaxlm train`
(real subprocesses where a signal or a kill is the point), compared with uninterrupted
runs of the same seed."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm.cli import main
from jaxlm.train.faults import KILL_BEFORE_COMMIT_ENV, KILL_ENV, POISON_ENV
from jaxlm.train.preemption import PREEMPTED_EXIT_CODE

from .conftest import REPO, TINY, subprocess_env

ENV = subprocess_env()


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxlm.cli",
        "train",
        "configs/shakespeare.yaml",
        *TINY,
        *overrides,
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]


def jaxlm_train(run_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run_dir, *overrides),
        cwd=REPO,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`jaxlm train` in this process, for runs that end without a signal or a kill:
    `main` returns what the script exits with, and the output is captured alike."""
    monkeypatch.chdir(REPO)

    def run(run_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = command(run_dir, *overrides)[3:]  # after `python -m jaxlm.cli`
        code = main(args)
        for name in env:
            monkeypatch.delenv(name)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


STEPS = 40  # long enough for a signal to land mid-run, and a data epoch boundary


def start_and_wait_for_logs(run_dir: Path, lines: int) -> subprocess.Popen:
    """A STEPS-step run without periodic checkpoints, returned once it has logged `lines`
    metrics records (or ended), for a signal to interrupt."""
    proc = subprocess.Popen(
        command(run_dir, f"train.steps={STEPS}", "checkpoint.every=1000"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def saved_state(run_dir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")


def assert_same_params(a: dict, b: dict) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a["params"], b["params"])


def train_here(run_dir: Path, *overrides: str) -> None:
    """`jaxlm train` in this process, for a module's fixture (which `in_process`, a
    per-test fixture, cannot serve); it must succeed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        code = main(command(run_dir, *overrides)[3:])
    assert code == 0, f"jaxlm train exited with {code}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, logging every step and saving every 5, that the
    interrupted ones must reproduce. It runs in this process (the flags are the
    subprocesses', see conftest's `subprocess_env`): no signal or kill is involved."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_here(run_dir, f"train.steps={STEPS}")
    return run_dir


def test_sigterm_saves_and_resumes_exactly(reference, tmp_path, in_process):
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_logs(run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
    step = max(losses(run_dir))
    assert 5 <= step < STEPS
    assert f"preempted at step {step}: checkpoint saved to {run_dir}/checkpoints/{step}" in stderr
    assert (run_dir / "checkpoints" / str(step) / "jaxlm_manifest.json").is_file()

    resumed = in_process(run_dir, f"train.steps={STEPS}", "checkpoint.every=1000")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir}/checkpoints/{step}" in resumed.stdout
    assert losses(run_dir) == losses(reference)  # every step, bit for bit
    assert_same_params(saved_state(run_dir, STEPS), saved_state(reference, STEPS))


def test_kill_during_checkpoint_write_is_ignored(reference, tmp_path, in_process):
    run_dir = tmp_path / "run"
    killed = jaxlm_train(run_dir, f"train.steps={STEPS}", **{KILL_ENV: "10"})
    assert killed.returncode == -signal.SIGKILL
    partial = [p.name for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]
    assert partial and partial[0].startswith("10.")  # the save that never finished

    resumed = in_process(run_dir, f"train.steps={STEPS}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping incomplete checkpoint {partial[0]}" in resumed.stdout
    assert f"resumed from {run_dir}/checkpoints/5" in resumed.stdout
    assert_same_params(saved_state(run_dir, STEPS), saved_state(reference, STEPS))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pristine") / "run"
    train_here(run_dir, "train.steps=10")
    return run_dir


@pytest.fixture
def two_checkpoints(pristine, tmp_path):
    """A run with checkpoints at steps 5 and 10, and its largest parameter file."""
    run_dir = tmp_path / "run"
    shutil.copytree(pristine, run_dir)
    files = sorted(
        (p for p in (run_dir / "checkpoints" / "10" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    return run_dir, files[-1]


def test_kill_after_manifest_before_commit_is_ignored(tmp_path, in_process):
    """The manifest is written inside the step before orbax commits it: a crash in
    between leaves an uncommitted step, never a committed one without a manifest."""
    run_dir = tmp_path / "run"
    killed = jaxlm_train(run_dir, "train.steps=12", **{KILL_BEFORE_COMMIT_ENV: "10"})
    assert killed.returncode == -signal.SIGKILL
    partial = run_dir / "checkpoints" / "10.orbax-checkpoint-tmp"
    assert (partial / "jaxlm_manifest.json").is_file()

    resumed = in_process(run_dir, "train.steps=12")
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping incomplete checkpoint {partial.name}" in resumed.stdout
    assert f"resumed from {run_dir}/checkpoints/5" in resumed.stdout


@pytest.mark.parametrize("damage", ["truncate", "alter", "no manifest"])
def test_corrupt_checkpoint_is_named_and_fallback_resumes(two_checkpoints, damage, in_process):
    run_dir, victim = two_checkpoints
    data = victim.read_bytes()
    if damage == "no manifest":  # every committed step has one: this one was damaged
        victim = run_dir / "checkpoints" / "10" / "jaxlm_manifest.json"
        victim.unlink()
        problem = "missing, so no file can be checked"
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
        problem = f"truncated or resized ({len(data) // 2} of {len(data)} bytes)"
    else:
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        problem = "contents altered (SHA-256 mismatch)"

    out = in_process(run_dir, "train.steps=12")
    assert out.returncode == 2
    assert f"checkpoint step 10 is corrupt: {victim}: {problem}" in out.stderr
    assert "set checkpoint.fallback=true" in out.stderr and "Traceback" not in out.stderr
    if damage != "alter":  # one fallback run: every damage fails the same verification
        return

    out = in_process(run_dir, "train.steps=12", "checkpoint.fallback=true")
    assert out.returncode == 0, out.stderr
    assert "skipping checkpoint step 10: checkpoint step 10 is corrupt" in out.stdout
    assert f"resumed from {run_dir}/checkpoints/5" in out.stdout


def test_resume_refuses_another_model(two_checkpoints, in_process):
    run_dir, _ = two_checkpoints
    out = in_process(run_dir, "train.steps=12", "model.d_model=32")
    assert out.returncode == 2
    assert (
        f"{run_dir} holds checkpoints of another model: model.d_model is 64 there, 32 here"
        in out.stderr
    )


def test_nonfinite_skip_drops_the_update_and_goes_on(tmp_path, in_process):
    run_dir = tmp_path / "run"
    out = in_process(
        run_dir, "train.steps=8", "checkpoint.every=1", "checkpoint.keep=10", **{POISON_ENV: "3"}
    )
    assert out.returncode == 0, out.stderr
    records = {
        r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }
    assert math.isnan(records[3]["loss"])
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5, 6, 7, 8))
    assert [records[s]["nonfinite_steps"] for s in (2, 3, 8)] == [0, 1, 1]
    before, after = saved_state(run_dir, 2), saved_state(run_dir, 3)
    assert_same_params(before, after)  # the poisoned step changed nothing
    jax.tree_util.tree_map(np.testing.assert_array_equal, before["opt_state"], after["opt_state"])
    assert int(after["step"]) == 3 and int(after["nonfinite"]) == 1


def test_nonfinite_stop_saves_last_good_state_and_resumes_exactly(reference, tmp_path, in_process):
    """The bad step 3 is only seen at step 5, two batches later (log_every=5): the
    saved data position must still be the good step's, and the resumed run must not
    stop again on clean batches."""
    run_dir = tmp_path / "run"
    args = (f"train.steps={STEPS}", "train.nonfinite=stop", "train.log_every=5")
    out = in_process(run_dir, *args, **{POISON_ENV: "3"})
    assert out.returncode == 3
    assert (
        "non-finite loss or gradients at step 3 (train.nonfinite=stop); "
        f"the last good state is in {run_dir}/checkpoints/2" in out.stderr
    )
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 in saved and max(saved) == 2
    for step in saved:  # never a checkpoint with NaN in it
        state = saved_state(run_dir, step)
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))

    resumed = in_process(run_dir, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir}/checkpoints/2" in resumed.stdout
    want = losses(reference)
    assert losses(run_dir) == {s: want[s] for s in range(5, STEPS + 1, 5)}
    assert_same_params(saved_state(run_dir, STEPS), saved_state(reference, STEPS))


def test_second_ctrl_c_aborts_at_once(tmp_path):
    """The first SIGINT asks for a checkpoint; a second one, before it is written,
    aborts without one."""
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_logs(run_dir, 2)
    proc.send_signal(signal.SIGINT)
    # Two signals sent at once arrive as one: wait until the first is handled.
    for line in proc.stdout:
        if "SIGINT received" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "jaxlm: interrupted" in stderr and "preempted" not in stderr
    assert not (run_dir / "checkpoints").is_dir() or not any(
        p.name.isdigit() for p in (run_dir / "checkpoints").iterdir()
    )
