"""`jaxlm data prepare` token shards, training from them, and data.mixture.

References are independent of the code under test: the documents are generated here
(so the split into documents is known), token counts and ids come from sentencepiece
directly, shard records are read with ArrayRecordReader, and mixture proportions are
counted from the rows' own tokens."""

import json
import random

import grain
import numpy as np
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordReader

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data import shards
from jaxlm.data.mixture import Mixture, mixture_stream, token_data
from jaxlm.data.pipeline import eval_batches, make_dataset, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import train_tokenizer

from .conftest import CORPUS, TINY

SHARD_BYTES = 20_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files of known documents: paragraphs of a text file and JSONL records."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = CORPUS.read_text().split()[:5000]
    docs = [" ".join(rng.choices(words, k=rng.randint(3, 60))) for _ in range(600)]
    (root / "a.txt").write_text("\n\n".join(docs[:400]) + "\n")
    with (root / "b.jsonl").open("w") as f:
        for doc in docs[400:]:
            f.write(json.dumps({"text": doc}) + "\n")
    tok = train_tokenizer(docs, root / "tok.model", 512)
    return root, docs, tok


def _config(root, tok, *extra):
    return load_config(None, [*TINY, f"data.path={root}", f"tokenizer.path={tok}", *extra])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _, tok = corpus
    out = tmp_path_factory.mktemp("shards")
    manifest = shards.prepare(
        _config(root, tok), out, workers=2, shard_bytes=SHARD_BYTES, progress=False
    )
    return out, manifest


def test_manifest_counts_match_sentencepiece(corpus, prepared):
    _, docs, tok = corpus
    out, manifest = prepared
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert manifest["records"] == len(docs)
    assert manifest["tokens"] == sum(len(sp.encode(d)) for d in docs)
    assert len(manifest["shards"]) > 3
    assert [s["documents"] for s in manifest["sources"]] == [400, 200]
    assert manifest["tokenizer"]["sha256"] == shards.sha256_file(tok)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Every record decodes back to its document, in corpus order.
    decoded = []
    for s in manifest["shards"]:
        reader = ArrayRecordReader(str(out / s["file"]))
        assert reader.num_records() == s["records"]
        ids = [np.frombuffer(r, "<i4") for r in reader.read_all()]
        assert sum(len(i) for i in ids) == s["tokens"]
        decoded += [sp.decode(i.tolist()) for i in ids]
        reader.close()
    assert decoded == docs


def test_interrupted_prepare_resumes_to_identical_shards(corpus, prepared, tmp_path, monkeypatch):
    root, _, tok = corpus
    ref, manifest = prepared
    write = shards._write_shard

    def failing(out, index, docs):
        if index == 2:
            raise KeyboardInterrupt
        return write(out, index, docs)

    monkeypatch.setattr(shards, "_write_shard", failing)
    config = _config(root, tok)
    with pytest.raises(KeyboardInterrupt):
        shards.prepare(config, tmp_path, shard_bytes=SHARD_BYTES, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / shards.shard_name(1)).exists()
    assert not (tmp_path / shards.shard_name(2)).exists()
    monkeypatch.setattr(shards, "_write_shard", write)
    again = shards.prepare(config, tmp_path, shard_bytes=SHARD_BYTES, progress=False)
    assert again["resumed_shards"] == 2
    assert again["shards"] == manifest["shards"]
    for s in manifest["shards"]:  # one worker here, two there: the same bytes
        assert (tmp_path / s["file"]).read_bytes() == (ref / s["file"]).read_bytes()
    # Other settings in the same directory are refused, not mixed in.
    with pytest.raises(shards.JaxlmError, match="holds shards of another prepare"):
        shards.prepare(config, tmp_path, shard_bytes=SHARD_BYTES // 2, progress=False)


def test_shard_source_is_lazy_and_reads_ids(prepared):
    out, manifest = prepared
    s = shards.open_shards(str(out))
    assert len(s) == manifest["records"]
    source = s.source()
    assert len(source) == manifest["records"]
    first = manifest["shards"][0]["records"]
    reader = ArrayRecordReader(str(out / manifest["shards"][1]["file"]))
    np.testing.assert_array_equal(source[first + 3], np.frombuffer(reader.read([3])[0], "<i4"))
    reader.close()


# ---------------------------------------------------------------- mixtures

WEIGHTS = (0.7, 0.2, 0.1)
SEQ = 16


def _constant_sources(n_docs=40, doc_len=SEQ + 1):
    """Source k holds documents of the token 10 + k only, each filling one row exactly."""

    def example(k, i):
        ids = np.full(doc_len, 10 + k, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}

    return [grain.MapDataset.range(n_docs).map(lambda i, k=k: example(k, i)) for k in range(3)]


def test_mixture_proportions_match_weights():
    ds = mixture_stream(
        Mixture(_constant_sources(), WEIGHTS),
        None,
        0,
        1,
        seq_len=SEQ,
        rows=4,
        seed=0,
        shuffle=True,
        repeat=True,
    )
    it = iter(ds)
    rows = np.concatenate([next(it)["inputs"] for _ in range(150)])  # 600 rows
    assert all(len(set(r.tolist())) == 1 for r in rows)  # no row mixes two sources
    share = np.bincount(rows[:, 0] - 10, minlength=3) / len(rows)
    np.testing.assert_allclose(share, WEIGHTS, atol=0.02)


def test_mixture_resumes_exactly():
    def dataset():
        return make_dataset(
            Mixture(_constant_sources(), WEIGHTS),
            None,
            seq_len=SEQ,
            batch_size=4,
            seed=3,
            num_streams=2,
            make_stream=mixture_stream,
        )

    it = iter(dataset())
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = iter(dataset())
    resumed.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------- training from shards


def test_first_batches_equal_the_text_path(corpus, prepared, tmp_path):
    """Same records in the same order, same index shuffle: the same batches as text."""
    root, _, tok = corpus
    out, _ = prepared
    train, held, tokenizer, make_stream = token_data(_config(out, tok), tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.read_bytes()
    text_train, text_held = split_documents(read_documents(str(root)), 0.1)
    kw = dict(seq_len=64, batch_size=8, seed=0, num_streams=2)
    ours = iter(make_dataset(train, tokenizer, make_stream=make_stream, **kw))
    text = iter(make_dataset(text_train, tokenizer, **kw))
    for _ in range(3):
        want, got = next(text), next(ours)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    kw = dict(seq_len=64, batch_size=8, max_batches=2)
    for want, got in zip(
        eval_batches(text_held, tokenizer, **kw),
        eval_batches(held, tokenizer, make_stream=make_stream, **kw),
        strict=True,
    ):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_shard_stream_resumes_exactly(corpus, prepared, tmp_path):
    _, _, tok = corpus
    out, _ = prepared
    train, _, tokenizer, make_stream = token_data(_config(out, tok), tmp_path)

    def dataset():
        kw = dict(seq_len=64, batch_size=8, seed=1, num_streams=4)
        return make_dataset(train, tokenizer, make_stream=make_stream, **kw)

    it = iter(dataset())
    for _ in range(80):  # into the second epoch (~62 batches a stream)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = iter(dataset())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], want["inputs"])


def _train(run_dir, *overrides):
    """test_cli.py's tiny run (config, overrides, 12 steps): one compiled program for both."""
    args = ["configs/shakespeare.yaml", *TINY, "train.steps=12", *overrides]
    return main(["train", "--run-dir", str(run_dir), "--no-progress", *args])


def test_trains_from_shards_and_refuses_another_tokenizer(corpus, prepared, tmp_path, capsys):
    root, docs, _ = corpus
    out, _ = prepared
    assert _train(tmp_path / "run", f"data.path={out}") == 0
    last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 12
    other = train_tokenizer(docs[:300], tmp_path / "other.model", 520)
    capsys.readouterr()
    assert _train(tmp_path / "r2", f"data.path={out}", f"tokenizer.path={other}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "were made by another tokenizer than tokenizer.path" in err[0], err
    assert not (tmp_path / "r2" / "config.yaml").exists()  # refused before anything else
    # A run directory trained with one tokenizer refuses shards of another.
    shards.prepare(
        load_config(None, [f"data.path={root}/b.jsonl", f"tokenizer.path={other}"]),
        tmp_path / "other_shards",
        progress=False,
    )
    assert _train(tmp_path / "run", f"data.path={tmp_path / 'other_shards'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer than the run directory's" in err[0], err


def test_trains_on_a_mixture(prepared, tmp_path):
    out, _ = prepared
    mix = f"data.mixture=[{{path: {out}, weight: 0.7}}, {{path: {CORPUS}, weight: 0.3}}]"
    assert _train(tmp_path / "run", mix) == 0


@pytest.mark.parametrize(
    "mixture, message",
    [
        (
            "[{path: a.txt, weight: 0.5}, {path: a.txt, weight: -1}]",
            "config key 'data.mixture[1].weight': -1.0 is negative",
        ),
        (
            "[{path: a.txt, weight: 0}, {path: a.txt, weight: 0}]",
            "config key 'data.mixture': the weights are all zero",
        ),
        (
            "[{path: a.txt, weight: 1}, {path: empty.txt, weight: 1}]",
            "data.mixture[1] ({d}/empty.txt): the source is empty (no non-blank text)",
        ),
    ],
)
def test_bad_mixtures(corpus, tmp_path, capsys, mixture, message):
    root, _, _ = corpus
    (tmp_path / "empty.txt").write_text("\n\n")
    mixture = mixture.replace("a.txt", f"{root}/a.txt").replace(
        "empty.txt", f"{tmp_path}/empty.txt"
    )
    assert _train(tmp_path / "run", f"data.mixture={mixture}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxlm: error: {message.format(d=tmp_path)}"]
