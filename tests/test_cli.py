"""The `jaxlm` command as a user runs it: real subprocesses, real messages."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import CORPUS, REPO, TINY


def jaxlm(*args, cwd=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=300,
    )


def test_train_prints_sample_and_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = jaxlm(
        "train",
        "configs/shakespeare.yaml",
        *TINY,
        "train.steps=12",
        "train.sample_tokens=40",
        "train.sample_prompt=ROMEO:",
        "--run-dir",
        str(run_dir),
        "mesh.fsdp=2",
    )
    assert out.returncode == 0, out.stderr
    assert "--- sample ---\nROMEO:" in out.stdout
    assert "eval loss" in out.stdout
    assert "loss=" in out.stderr and "tok_s=" in out.stderr  # the progress bar
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 12
    assert "fsdp: 2" in (run_dir / "config.yaml").read_text()


def test_tokenizer_train_command(tmp_path):
    out = jaxlm(
        "tokenizer",
        "train",
        f"data.path={CORPUS}",
        "tokenizer.vocab_size=400",
        "--out",
        str(tmp_path / "t.model"),
    )
    assert out.returncode == 0, out.stderr
    assert "(400 pieces)" in out.stdout and (tmp_path / "t.model").is_file()


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Ceci n'est pas de l'UTF-8: caf\xe9\n".encode("latin-1"))
    (tmp_path / "bad.yaml").write_text("train:\n  stesp: 3\n")
    (tmp_path / "junk.model").write_text("not a model")
    return tmp_path


CASES = [
    (["train.stpes=3"], "config key 'train.stpes': unknown key"),
    (["train.batch_size=eight"], "'train.batch_size': invalid value 'eight', expected int"),
    (["optim.lr=-1"], "config key 'optim.lr': must be a positive number"),
    (["mesh.data=3"], "mesh: data=3 x fsdp=1 x tensor=1 needs 3 devices, have 8"),
    (["train.batch_size=4", "mesh.data=8"], "'train.batch_size': 4 cannot be split over 8 devices"),
    (["data.path={tmp}/empty.txt"], "the corpus at '{tmp}/empty.txt' is empty"),
    (["data.path={tmp}/latin1.txt"], "{tmp}/latin1.txt: not valid UTF-8 (byte 30, line 1)"),
    (["data.path={tmp}/nothing/*.txt"], "data.path: no data files found at '{tmp}/nothing/*.txt'"),
    (["tokenizer.path={tmp}/junk.model"], "tokenizer file {tmp}/junk.model is not a sentencepiece"),
    (["tokenizer.path={tmp}/none.model"], "tokenizer file not found: {tmp}/none.model"),
    (["{tmp}/bad.yaml"], "config key 'train.stesp': unknown key (from {tmp}/bad.yaml)"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[m.split(":")[0][:30] for _, m in CASES])
def test_bad_input_fails_fast_with_one_line(bad_inputs, args, message):
    args = [a.format(tmp=bad_inputs) for a in args]
    config = [a for a in args if a.endswith(".yaml")] or ["configs/shakespeare.yaml"]
    overrides = [a for a in args if not a.endswith(".yaml")]
    out = jaxlm("train", *config, *TINY, *overrides, "--run-dir", str(bad_inputs / "run"))
    assert out.returncode == 2
    assert message.format(tmp=bad_inputs) in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
