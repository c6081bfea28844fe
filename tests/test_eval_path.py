"""`data.eval_path`: a held-out set of its own (Hugging Face's validation_file).

Training evaluates on that file, and its loss is checked against the final parameters
applied to the file's batches with a NumPy cross-entropy; all of `data.path` trains;
`jaxlm eval RUN` scores the same set; a bad path fails in one line before any compile.
"""

import json

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data.pipeline import eval_batches
from jaxlm.data.sources import read_documents
from jaxlm.data.tasks import train_and_held_out
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models import build_model
from jaxlm.train.loop import train
from jaxlm.train.metrics import read_metrics

from .conftest import CORPUS, TINY


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    docs = read_documents(str(CORPUS))
    root = tmp_path_factory.mktemp("eval_path")
    (root / "train.txt").write_text("\n\n".join(docs[:300]))
    (root / "valid.txt").write_text("\n\n".join(docs[300:400]))
    return root / "train.txt", root / "valid.txt"


def config_for(train_file, valid_file, *extra):
    return load_config(
        None,
        [
            *TINY,
            "name=eval_path",
            f"data.path={train_file}",
            f"data.eval_path={valid_file}",
            "train.steps=3",
            "train.eval_every=3",
            *extra,
        ],
    )


def test_all_of_data_path_trains_and_eval_path_is_held_out(files):
    train_file, valid_file = files
    train_docs, held_out = train_and_held_out(config_for(train_file, valid_file))
    assert list(train_docs) == list(read_documents(str(train_file)))
    assert list(held_out) == list(read_documents(str(valid_file)))


def test_training_evaluates_on_eval_path(files, tmp_path, capsys):
    train_file, valid_file = files
    config = config_for(train_file, valid_file)
    result = train(config, tmp_path / "run", progress=False)
    eval_loss = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["eval_loss"]

    # Reference: the final params on the file's own batches, cross-entropy in NumPy.
    batches = eval_batches(
        read_documents(str(valid_file)),
        load_tokenizer(tmp_path / "run" / "tokenizer.model"),
        seq_len=config.train.seq_len,
        batch_size=config.train.batch_size,
        max_batches=config.train.eval_batches,
    )
    model = build_model(result.config.model)
    nll, count = 0.0, 0
    for b in batches:
        logits = model.apply(
            {"params": result.state.params},
            b["inputs"],
            segment_ids_BL=b["segment_ids"],
            positions_BL=b["positions"],
        )
        x = np.asarray(logits, np.float64)
        x -= x.max(axis=-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        real = b["segment_ids"] > 0
        nll, count = nll - picked[real].sum(), count + real.sum()
    assert eval_loss == pytest.approx(nll / count, rel=1e-4)

    # `jaxlm eval RUN` scores the run's held-out set: the eval file, not a split.
    scores = tmp_path / "scores.json"
    args = ["eval", str(tmp_path / "run"), "--batch-size", "8", "--max-batches", "2"]
    assert main([*args, "--json", str(scores)]) == 0
    out = capsys.readouterr().out
    assert str(valid_file) in out and "held-out split" not in out
    assert json.loads(scores.read_text())["loss"] == pytest.approx(eval_loss, rel=1e-5)


def test_a_missing_eval_path_fails_in_one_line_before_compiling(files, tmp_path, capsys):
    train_file, _ = files
    args = ["train", *TINY, f"data.path={train_file}", f"data.eval_path={tmp_path}/none.txt"]
    assert main([*args, "--run-dir", f"{tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlm: error: data.eval_path:"), err
