"""Lazy corpus sources (issue #21): ArrayRecord, Parquet and indexed text/JSONL give the
documents they were written from, read by index; processes read disjoint records; each
epoch has a new order; the iterator state does not grow with the corpus; bad files are
one line each."""

import json
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from jaxlm.cli import main
from jaxlm.data import text_index
from jaxlm.data.pipeline import make_dataset, split_documents
from jaxlm.data.sources import LazySequence, read_documents, split_text
from jaxlm.errors import JaxlmError

from .conftest import REPO, TINY

DOCS = [
    "First paragraph.\nSecond line of it.",
    "héllo ☃ wörld",
    "  leading spaces\n\ttab",
    "x",
    "a much longer document " * 40,
    "",  # an empty document is a record like any other
    "last",
]


def write_array_record(path, records: list[bytes]) -> None:
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_array_record(root / "docs.array_record", [json.dumps({"text": d}).encode() for d in DOCS])
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, root / "docs.parquet", row_group_size=3)  # three row groups
    return root


@pytest.mark.parametrize("name", ["docs.array_record", "docs.parquet"])
def test_records_are_the_documents_written(files, name):
    docs = read_documents(str(files / name))
    assert len(docs) == len(DOCS)
    order = list(range(len(DOCS)))
    random.Random(0).shuffle(order)  # random access, across row groups
    assert [docs[i] for i in order] == [DOCS[i] for i in order]
    assert list(docs[1::3]) == DOCS[1::3]  # slices are views


def test_directory_mixes_formats_in_file_order(files, tmp_path):
    for name in ("docs.array_record", "docs.parquet"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2"}\r\n')
    (tmp_path / "c.txt").write_text("p1\n\n\np2\n")
    docs = read_documents(str(tmp_path))
    assert list(docs) == ["j1", "j2", "p1", "p2", *DOCS, *DOCS]  # sorted by file name


def test_parquet_bound_needs_no_reads(files):
    docs = read_documents(str(files / "docs.parquet"))
    assert docs.max_chars() >= sum(len(d.encode()) for d in DOCS)


@pytest.mark.parametrize("split", ["paragraph", "line", "file"])
def test_text_index_cuts_as_split_text(tmp_path, monkeypatch, split):
    """Chunks of a few bytes, so paragraphs and runs of blank lines cross them."""
    monkeypatch.setattr(text_index, "CHUNK", 5)
    rng = random.Random(1)
    pieces = ["ab", "é", " ", "\t", "\n", "\n", "\n", "word", "\r\n"]
    text = "".join(rng.choice(pieces) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text, newline="")
    got = list(read_documents(str(path), split=split))
    if split == "line":  # lines end at "\n" (a "\r" before it dropped), blanks skipped
        want = [w.removesuffix("\r") for w in text.split("\n")]
        want = [w for w in want if w.strip()]
    else:
        want = split_text(text, split)
    assert got == want


def test_text_index_is_cached_and_renewed(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\ntwo\n")
    read_documents(str(path))
    index = text_index.index_file(epath.Path(path), "paragraph")
    stamp = index.stat().mtime
    assert list(read_documents(str(path))) == ["one", "two"]
    assert index.stat().mtime == stamp  # not rebuilt
    path.write_text("one\n\ntwo\n\nthree\n")
    assert list(read_documents(str(path))) == ["one", "two", "three"]  # size changed


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": \n{"body": "x"}\n')
    docs = read_documents(str(path))
    with pytest.raises(JaxlmError, match=r"r.jsonl, line 3: not valid JSON"):
        docs[1]
    with pytest.raises(JaxlmError, match=r"r.jsonl, line 4: no string field 'text'"):
        docs[2]


class Numbers(LazySequence):
    """Document i is the text of i: a corpus of any size that costs nothing."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock, self.read = threading.Lock(), []

    def __len__(self) -> int:
        return self.n

    def _get(self, i: int) -> str:
        with self.lock:
            self.read.append(i)
        return str(i)


class IdTokenizer:
    """Document "i" is the single token 10 + i % 1000, between BOS (1) and EOS (2)."""

    def bos_id(self) -> int:
        return 1

    def eos_id(self) -> int:
        return 2

    def encode(self, text: str) -> list[int]:
        return [10 + int(text) % 1000]


def doc_ids(batches) -> list[int]:
    """The documents in the order the batches hold them (each once: its token)."""
    ids = []
    for batch in batches:
        inputs = batch["inputs"][batch["segment_ids"] > 0]
        ids.extend((inputs[inputs >= 10] - 10).tolist())
    return ids


def test_each_epoch_has_a_new_order():
    n = 24
    ds = make_dataset(Numbers(n), IdTokenizer(), seq_len=6, batch_size=1, seed=3, repeat=True)
    it = iter(ds)
    ids = doc_ids(next(it) for _ in range(3 * n * 2 // 6 + 2))[: 3 * n]
    epochs = [ids[:n], ids[n : 2 * n], ids[2 * n :]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # each a permutation
    assert epochs[0] != list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_two_processes_read_disjoint_records():
    n, streams = 103, 4
    seen, read = [], []
    for process in range(2):
        source = Numbers(n)
        train, _ = split_documents(source, 0.1)
        ds = make_dataset(
            train,
            IdTokenizer(),
            seq_len=8,
            batch_size=2,
            seed=0,
            repeat=False,
            process_index=process,
            process_count=2,
            num_streams=streams,
        )
        seen.append(set(doc_ids(ds)))
        read.append(set(source.read))
    held_out = {g for g in range(n) if g % 10 == 9}
    assert not read[0] & read[1]  # no record read by both
    assert read[0] | read[1] == set(range(n)) - held_out
    # A process's records are its two streams' share of the train split, and the batches
    # hold them (bar the last partial rows).
    train = sorted(set(range(n)) - held_out)
    mine = [
        {train[i] for i in range(len(train)) if i % streams in (2 * p, 2 * p + 1)} for p in (0, 1)
    ]
    assert read == mine
    for p in (0, 1):
        assert seen[p] <= mine[p] and len(seen[p]) >= len(mine[p]) - 8


def test_iterator_state_does_not_grow_with_the_corpus():
    sizes = []
    for n in (1_000, 10**12):
        it = iter(make_dataset(Numbers(n), IdTokenizer(), seq_len=8, batch_size=4, seed=0))
        for _ in range(3):
            next(it)
        sizes.append(len(json.dumps(it.get_state())))
    assert sizes[1] <= sizes[0] + 16  # a few more digits, no more


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: pq.write_table(pa.table({"body": ["a"]}), d / "c.parquet"),
            "data file {d}/c.parquet: no column 'text' (columns: body; set data.text_field)",
        ),
        (
            lambda d: write_array_record(d / "c.array_record", [b'{"body": "a"}']),
            "data file {d}/c.array_record, record 0: no string field 'text' (set data.text_field)",
        ),
    ],
    ids=["parquet", "array_record"],
)
def test_bad_records_are_one_line(tmp_path, make, message, capsys, monkeypatch):
    make(tmp_path)
    monkeypatch.chdir(REPO)
    args = ["train", "configs/shakespeare.yaml", *TINY, f"data.path={tmp_path}"]
    code = main([*args, "--run-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err == f"jaxlm: error: {message.format(d=tmp_path)}\n"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_tokenizer_reads_a_bounded_seeded_sample(tiny_config):
    from jaxlm.data.tasks import sample_examples

    config = tiny_config.replace(tokenizer={"sample_docs": 50, "sample_bytes": 10**9})
    corpus = Numbers(10**9)
    sample = sample_examples(config, corpus)
    assert len(sample) == 50 and len(set(sample)) == 50
    assert sorted(corpus.read) == sorted(int(s) for s in sample)  # read those alone
    assert sample_examples(config, Numbers(10**9)) == sample  # seeded
    assert sample_examples(config.replace(seed=config.seed + 1), Numbers(10**9)) != sample
    capped = config.replace(tokenizer={"sample_bytes": 30})  # documents of 8-9 digits
    assert 3 <= len(sample_examples(capped, Numbers(10**9))) <= 4
    few = Numbers(20)
    assert sample_examples(config, few) == [str(i) for i in range(20)]  # all, in order
