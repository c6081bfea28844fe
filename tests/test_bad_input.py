"""More wrong input through the CLI: each is one line naming the problem, exit code 2,
no traceback, and nothing written. (The config, data and tokenizer cases of
`jaxlm train`, as a real process, are in test_cli.py.)"""

import json
import shutil

import pytest

from jaxlm.cli import main

from .conftest import REPO, TINY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Hugging Face GPT-2 directory and damaged variants of it."""
    from tokenizers import Tokenizer

    from .test_hf import _bpe_tokenizer, _hf_model

    root = tmp_path_factory.mktemp("bad")
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    _hf_model("gpt2", _bpe_tokenizer(gpt2).get_vocab_size()).save_pretrained(gpt2)

    shutil.copytree(gpt2, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    shutil.copytree(gpt2, root / "foo")
    config = json.loads((root / "foo" / "config.json").read_text()) | {"model_type": "foo"}
    (root / "foo" / "config.json").write_text(json.dumps(config))

    shutil.copytree(gpt2, root / "big_tokenizer")  # 10 pieces the model cannot embed
    tok = Tokenizer.from_file(str(gpt2 / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save(str(root / "big_tokenizer" / "tokenizer.json"))

    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    (root / "pairs.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    return root


CASES = [
    (
        ["generate", "{d}/not_a_model", "--prompt", "hi"],
        "{d}/not_a_model: not a run, model or Hugging Face directory "
        "(no config.yaml or config.json)",
    ),
    (
        ["convert", "from-hf", "{d}/foo", "{d}/out"],
        "config.json: model_type 'foo' is not supported (jaxlm converts gpt2, llama, t5, bert)",
    ),
    (
        ["convert", "from-hf", "{d}/truncated", "{d}/out"],
        "{d}/truncated/model.safetensors: not a readable safetensors file",
    ),
    (
        ["eval", "{d}/gpt2", "--pairs", "{d}/pairs.jsonl"],
        "data file {d}/pairs.jsonl, line 1: no string field 'src' (set --source-field)",
    ),
    (
        ["eval", "--predictions", "{d}/pairs.jsonl", "--prediction-field", "question"],
        "data file {d}/pairs.jsonl, line 1: no string field 'tgt' (set --reference-field)",
    ),
    (
        ["generate", "{d}/big_tokenizer", "--prompt", "hi"],
        "{d}/big_tokenizer: the tokenizer has 310 pieces, more than the model's vocabulary "
        "of 300 (model.vocab_size)",
    ),
    (
        ["train", "configs/shakespeare.yaml", *TINY, "model.max_len=32", "--run-dir", "{d}/out"],
        "config key 'train.seq_len': 64 exceeds model.max_len 32",
    ),
    (
        ["data", "prepare", "configs/shakespeare.yaml", "data.eval_path=x.txt", "--out", "{d}/out"],
        "data.eval_path: token shards hold out by data.eval_fraction; unset data.eval_path",
    ),
]


@pytest.mark.parametrize(
    "args, message", CASES, ids=[c[0][0] + str(i) for i, c in enumerate(CASES)]
)
def test_bad_input_is_one_line_and_writes_nothing(inputs, args, message, capsys, monkeypatch):
    """In this process (`main` returns what the `jaxlm` script exits with); the exit
    code and stderr of a real `jaxlm` process are checked in test_cli.py."""
    monkeypatch.chdir(REPO)
    code = main([a.format(d=inputs) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.startswith(f"jaxlm: error: {message.format(d=inputs)}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (inputs / "out").exists()
