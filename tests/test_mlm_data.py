"""BERT's MLM + NSP data and T5's seq2seq pairs: masking statistics, exact resume, and
the shapes and alignment of what the objectives read."""

import json

import numpy as np
import pytest

from jaxlm.data import mlm, seq2seq
from jaxlm.data.pipeline import make_dataset, split_documents
from jaxlm.data.sources import read_documents
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import JaxlmError

from .conftest import CORPUS, REPO

SEQ_LEN = 48


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    docs, _ = split_documents(read_documents(str(CORPUS)), 0.1)
    docs = docs[:2000]  # enough segments for the statistics, quick to tokenize
    path = tmp_path_factory.mktemp("tok") / "bert.model"
    tok = load_tokenizer(train_tokenizer(docs, path, 400, extra_symbols=[mlm.MASK_PIECE]))
    return docs, tok


def _batches(docs, tok, n, **kw):
    kw = dict(seq_len=SEQ_LEN, batch_size=32, seed=3, make_stream=mlm.mlm_stream) | kw
    it = iter(make_dataset(docs, tok, **kw))
    return [next(it) for _ in range(n)], it


def test_mask_piece_is_one_token_of_its_own(bert_data):
    _, tok = bert_data
    mask = mlm.mask_id(tok)
    assert mask > 3 and tok.id_to_piece(mask) == "<mask>"
    assert mask in tok.encode("a <mask> b")  # text never splits it


def test_masking_and_nsp_statistics(bert_data):
    docs, tok = bert_data
    cls, sep, mask = mlm.special_ids(tok)
    batches, _ = _batches(docs, tok, 40)  # 1280 examples, ~23k maskable tokens
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    real = b["segment_ids"] == 1
    special = np.isin(b["targets"], [cls, sep])
    maskable = real & ~special
    chosen = b["mlm_mask"] == 1
    # Never a special token, never padding; per example exactly round(15%) of the rest.
    assert not (chosen & ~maskable).any()
    np.testing.assert_array_equal(chosen.sum(1), np.maximum(1, np.round(0.15 * maskable.sum(1))))
    assert chosen.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
    # 80% [MASK], 10% another token, 10% kept (binomial sd ~ 0.3%; tolerance ~ 5 sd).
    n = chosen.sum()
    as_mask = (b["inputs"] == mask) & chosen
    kept = (b["inputs"] == b["targets"]) & chosen
    other = chosen & ~as_mask & ~kept
    assert as_mask.sum() / n == pytest.approx(0.8, abs=0.02)
    # A random replacement can draw the original token (1 in ~400): it counts as kept.
    assert other.sum() / n == pytest.approx(0.1, abs=0.015)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.015)
    assert not np.isin(b["inputs"][other], [cls, sep, mask, tok.pad_id(), tok.unk_id()]).any()
    # Unchosen tokens are the targets, unchanged; padding is PAD with type 0.
    np.testing.assert_array_equal(b["inputs"][~chosen], b["targets"][~chosen])
    assert (b["targets"][~real] == tok.pad_id()).all() and (b["token_types"][~real] == 0).all()
    # NSP: B is the true next segment half the time (sd 1.4% over 1280 examples).
    assert b["nsp_labels"].mean() == pytest.approx(0.5, abs=0.05)
    # Layout: [CLS] A [SEP] B [SEP], token type 1 exactly on B [SEP].
    for row in range(64):
        t, types = b["targets"][row][real[row]], b["token_types"][row][real[row]]
        seps = np.flatnonzero(t == sep)
        assert t[0] == cls and len(seps) == 2 and seps[1] == len(t) - 1
        np.testing.assert_array_equal(types, np.arange(len(t)) > seps[0])


def test_next_segments_are_true_and_others_are_not(bert_data):
    docs, tok = bert_data
    segs = mlm.make_segments(docs, tok, SEQ_LEN)
    assert all(0 < len(s) <= mlm.max_segment_len(SEQ_LEN) for s in segs.tokens)
    batches, _ = _batches(docs, tok, 4, shuffle=False, batch_size=16)  # in order of A
    _, sep, _ = mlm.special_ids(tok)
    rows = [(t, label) for batch in batches for t, label in zip(*_two(batch), strict=True)]
    for (t, label), a in zip(rows, segs.starts, strict=False):
        first, second = np.flatnonzero(t == sep)[:2]
        np.testing.assert_array_equal(t[1:first], segs.tokens[a])
        b_tokens = t[first + 1 : second]
        if label == mlm.IS_NEXT:
            np.testing.assert_array_equal(b_tokens, segs.tokens[a + 1])
            assert segs.doc[a + 1] == segs.doc[a]
        else:  # some segment of another document
            others = np.flatnonzero(segs.doc != segs.doc[a])
            assert any(np.array_equal(b_tokens, segs.tokens[k]) for k in others)


def _two(batch):
    return batch["targets"], batch["nsp_labels"]


def test_mlm_iterator_resumes_exactly(bert_data):
    docs, tok = bert_data
    docs, kw = docs[:600], dict(num_streams=2)
    _, it = _batches(docs, tok, 3, batch_size=8, **kw)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    _, fresh = _batches(docs, tok, 0, batch_size=8, **kw)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        assert got.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    # Two processes of one stream each read the two halves of the same (4th) batch.
    first = want[0]
    halves = [
        _batches(docs, tok, 4, batch_size=4, process_index=p, process_count=2, **kw)[0][-1]
        for p in (0, 1)
    ]
    for k in first:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), first[k])


def test_a_tokenizer_without_a_mask_piece_is_refused(tmp_path):
    docs = read_documents(str(CORPUS))[:300]
    tok = load_tokenizer(train_tokenizer(docs, tmp_path / "plain.model", 350))
    with pytest.raises(JaxlmError, match="no mask piece"):
        mlm.mask_id(tok)


def test_seq2seq_pairs(tmp_path):
    pairs = seq2seq.read_pairs(str(REPO / "data" / "xquad_en_de.jsonl"))
    assert len(pairs) == 1127 and pairs[0][0].startswith("The Panthers defense")
    docs = [text for pair in pairs[:500] for text in pair]
    tok = load_tokenizer(train_tokenizer(docs, tmp_path / "t5.model", 400))
    ex = seq2seq.encode_pair(("Who won?", "Wer hat gewonnen?"), tok, 12, 20)
    src, tgt = tok.encode("Who won?"), tok.encode("Wer hat gewonnen?")
    assert len(src) + 1 < 12 and len(tgt) + 1 < 20
    np.testing.assert_array_equal(ex["inputs"][: len(src) + 1], [*src, tok.eos_id()])
    assert ex["input_mask"].sum() == len(src) + 1 and (ex["inputs"][len(src) + 1 :] == 0).all()
    np.testing.assert_array_equal(ex["targets"][: len(tgt) + 1], [*tgt, tok.eos_id()])
    np.testing.assert_array_equal(ex["decoder_inputs"][: len(tgt) + 1], [tok.bos_id(), *tgt])
    assert ex["target_mask"].sum() == len(tgt) + 1
    long = seq2seq.encode_pair((pairs[0][0], pairs[0][1]), tok, 12, 10)  # truncated, EOS kept
    assert long["inputs"][-1] == long["targets"][-1] == tok.eos_id()
    assert long["input_mask"].all() and long["target_mask"].all()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"en": "a", "tgt": "b"}) + "\n")
    with pytest.raises(JaxlmError, match="no string field 'src' .set data.source_field"):
        seq2seq.read_pairs(str(tmp_path / "bad.jsonl"))
