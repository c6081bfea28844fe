"""The `jaxlm` command as a user runs it: real subprocesses, real messages (the many
bad-input cases call `main` in this process; test_invalid_yaml checks that a real
process prints the same one line and exits with 2)."""

import json
import subprocess
import sys

import pytest

from jaxlm.cli import main

from .conftest import CORPUS, REPO, TINY, subprocess_env


def jaxlm(*args, cwd=None):
    env = subprocess_env()
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
    (tmp_path / "rec.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "bad.yaml").write_text("train:\n  stesp: 3\n")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    (tmp_path / "junk.model").write_text("not a model")
    (tmp_path / "short.txt").write_text("To be, or not to be.\n\nThat is the question.\n\nAy.\n")
    return tmp_path


# (arguments after the preset, the whole message the user sees). The checkpoint cases
# (corrupt files, another model) are in test_reliability.py.
CASES = [
    (["train.stpes=3"], "config key 'train.stpes': unknown key (from override 'train.stpes=3')"),
    (
        ["train.batch_size=eight"],
        "config key 'train.batch_size': invalid value 'eight', expected int "
        "(from override 'train.batch_size=eight')",
    ),
    (["optim.lr=-1"], "config key 'optim.lr': must be a positive number"),
    (["train.nonfinite=maybe"], "config key 'train.nonfinite': must be skip or stop"),
    (
        ["model.vocab_size=300"],
        "config key 'model.vocab_size': 300 is smaller than tokenizer.vocab_size 512",
    ),
    (
        ["train.batch_size=4", "mesh.data=8"],
        "config key 'train.batch_size': 4 cannot be split over 8 devices of mesh axes "
        "('data', 'fsdp')",
    ),
    (
        ["data.path={tmp}/empty.txt"],
        "data.path: the corpus at '{tmp}/empty.txt' is empty (no non-blank text)",
    ),
    (
        ["data.path={tmp}/latin1.txt"],
        "data file {tmp}/latin1.txt: not valid UTF-8 (byte 30, line 1)",
    ),
    (
        ["data.path={tmp}/rec.jsonl"],
        "data file {tmp}/rec.jsonl, line 1: no string field 'text' (set data.text_field)",
    ),
    (
        ["data.path={tmp}/nothing/*.txt"],
        "data.path: no data files found at '{tmp}/nothing/*.txt'",
    ),
    (
        ["tokenizer.path={tmp}/junk.model"],
        "tokenizer file {tmp}/junk.model is not a sentencepiece model",
    ),
    (["tokenizer.path={tmp}/none.model"], "tokenizer file not found: {tmp}/none.model"),
    (
        ["data.path={tmp}/short.txt"],
        "data.path: the training split has at most 53 tokens, fewer than one batch of 8 x 64; "
        "add text or lower train.batch_size/train.seq_len",
    ),
    (
        ["{tmp}/bad.yaml"],
        "config key 'train.stesp': unknown key (from {tmp}/bad.yaml)",
    ),
    (["{tmp}/nope.yaml"], "config file not found: {tmp}/nope.yaml"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_fails_fast_with_one_line(bad_inputs, args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = [a.format(tmp=bad_inputs) for a in args]
    config = [a for a in args if a.endswith(".yaml")] or ["configs/shakespeare.yaml"]
    overrides = [a for a in args if not a.endswith(".yaml")]
    code = main(["train", *config, *TINY, *overrides, "--run-dir", str(bad_inputs / "run")])
    assert code == 2
    assert capsys.readouterr().err == f"jaxlm: error: {message.format(tmp=bad_inputs)}\n"


def test_invalid_yaml(bad_inputs):
    out = jaxlm("train", str(bad_inputs / "broken.yaml"))
    assert out.returncode == 2
    assert out.stderr == (
        f"jaxlm: error: config file {bad_inputs}/broken.yaml is not valid YAML "
        "(line 2, column 1): did not find expected ',' or ']'\n"
    )
