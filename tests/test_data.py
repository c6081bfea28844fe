import json

import numpy as np
import pytest

from jaxlm.data.pipeline import eval_batches, make_dataset, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    cache_dir,
    cached_tokenizer,
    corpus_key,
    load_tokenizer,
)
from jaxlm.errors import JaxlmError

from .conftest import CORPUS


@pytest.fixture(scope="module")
def docs():
    return read_documents(str(CORPUS))


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return load_tokenizer(cached_tokenizer(docs[:2000], path, 512, "bpe"))


def test_paragraph_documents(docs):
    assert len(docs) == 7222  # speeches separated by blank lines
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_tokenizer_round_trips_text(tokenizer, docs):
    assert tokenizer.get_piece_size() == 512
    for doc in [*docs[:50], "Unseen: héllo ☃\n\n  spaced"]:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_tokenizer_is_cached(tokenizer, docs, tmp_path):
    cached = cache_dir() / "tokenizers" / f"{corpus_key(docs[:2000], 512, 'bpe')}.model"
    stamp = cached.stat().st_mtime_ns
    cached_tokenizer(docs[:2000], tmp_path / "again.model", 512, "bpe")
    assert cached.stat().st_mtime_ns == stamp  # reused, not retrained
    assert (tmp_path / "again.model").read_bytes() == cached.read_bytes()


def _dataset(docs, tokenizer, **kw):
    args = dict(seq_len=32, batch_size=4, seed=0)
    args.update(kw)
    return make_dataset(docs, tokenizer, **args)


def test_packing_keeps_documents_apart(docs, tokenizer):
    batch = next(iter(_dataset(docs[:200], tokenizer, shuffle=False, seq_len=64)))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    assert batch["inputs"].shape == (4, 64)
    for row in range(4):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        inp, tgt = batch["inputs"][row], batch["targets"][row]
        for s in set(seg.tolist()) - {0}:
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            # within a document the target is the next input: nothing crosses a boundary
            np.testing.assert_array_equal(tgt[idx][:-1], inp[idx][1:])
    # The first row starts with document 0, BOS first, EOS as its last target.
    first = tokenizer.encode(docs[0])
    n = len(first) + 1
    np.testing.assert_array_equal(batch["inputs"][0, :n], [BOS_ID, *first])
    np.testing.assert_array_equal(batch["targets"][0, :n], [*first, EOS_ID])
    assert batch["segment_ids"][0, n] == 2


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_pipeline_is_deterministic_per_seed(docs, tokenizer):
    a = _take(iter(_dataset(docs, tokenizer, seed=1)), 3)
    b = _take(iter(_dataset(docs, tokenizer, seed=1)), 3)
    c = _take(iter(_dataset(docs, tokenizer, seed=2)), 3)
    assert _same(a, b)
    assert not _same(a, c)


def test_pipeline_resumes_mid_epoch(docs, tokenizer):
    small = docs[:60]  # a few batches an epoch, so the run crosses epochs
    it = iter(_dataset(small, tokenizer))
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 6)
    fresh = iter(_dataset(small, tokenizer))
    fresh.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    assert _same(_take(fresh, 6), expected)


def test_pipeline_resumes_at_every_position_through_its_checkpoint_files(docs, tokenizer, tmp_path):
    """Save the position (as checkpoints do: JSON files) before every batch and resume
    from it; each resumed batch must be the uninterrupted run's. A row that ends where a
    document ends leaves no partial document, the case JSON's lists once broke."""
    from etils import epath

    from jaxlm.data.checkpointing import StreamsHandler

    make = lambda: _dataset(docs[:80], tokenizer, batch_size=2, num_streams=2)  # noqa: E731
    it, states, expected = iter(make()), [], []
    for _ in range(25):
        states.append(it.get_state())
        expected.append(next(it))
    at_boundary = [
        k
        for k, state in enumerate(states)
        if any(
            set(map(tuple, s["remainder_slices"].values())) == {(-1, -1)}
            for s in state["streams"].values()
        )
    ]
    assert [k for k in at_boundary if k > 0], "no mid-run position at a document boundary"
    handler = StreamsHandler()
    for k, state in enumerate(states):
        directory = epath.Path(tmp_path / str(k))
        directory.mkdir()
        saved = iter(make())
        saved.set_state(state)
        handler.save(directory, saved)
        resumed = handler.restore(directory, iter(make()))
        assert _same([next(resumed)], [expected[k]]), f"resumed at batch {k}"


def test_processes_read_disjoint_shares(docs, tokenizer):
    for process_index in range(2):
        ds = make_dataset(
            docs[:40],
            tokenizer,
            seq_len=32,
            batch_size=1,
            seed=0,
            shuffle=False,
            repeat=False,
            process_index=process_index,
            process_count=2,
        )
        seen = np.concatenate([b["inputs"][0][b["segment_ids"][0] > 0] for b in ds])
        mine = np.concatenate([[BOS_ID, *tokenizer.encode(d)] for d in docs[process_index:40:2]])
        np.testing.assert_array_equal(seen, mine[: len(seen)])
        assert len(seen) == len(mine)


def test_split_documents_holds_out_every_tenth(docs):
    train, held = split_documents(docs, 0.1)
    everything = list(docs)
    assert list(held) == everything[9::10]
    assert list(train) == [d for g, d in enumerate(everything) if g % 10 != 9]
    tiny_train, tiny_held = split_documents(everything[:5], 0.1)  # under 1/f: the last
    assert list(tiny_train) == everything[:4] and list(tiny_held) == everything[4:5]


def test_eval_split_too_small(docs, tokenizer):
    with pytest.raises(JaxlmError, match="eval split is too small"):
        eval_batches(docs[:1], tokenizer, seq_len=64, batch_size=64, max_batches=1)


def test_bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "rec.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(JaxlmError, match="is empty"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(JaxlmError, match=r"latin1.txt: not valid UTF-8 \(byte 3, line 1\)"):
        read_documents(str(tmp_path / "latin1.txt"))
    with pytest.raises(JaxlmError, match=r"rec.jsonl, line 2: no string field 'text'"):
        list(read_documents(str(tmp_path / "rec.jsonl")))  # when the record is read
    with pytest.raises(JaxlmError, match="no data files found"):
        read_documents(str(tmp_path / "missing" / "*.txt"))


def test_jsonl_and_directories(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_text("para one\n\npara two\n")
    assert list(read_documents(str(tmp_path))) == ["first doc", "second", "para one", "para two"]
    assert list(read_documents(str(tmp_path / "b.txt"), split="file")) == ["para one\n\npara two"]
