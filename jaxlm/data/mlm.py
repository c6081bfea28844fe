"""BERT's pretraining data: sentence pairs for NSP, with tokens masked for MLM.

Each document is tokenized once and cut into segments of whole lines (a line longer
than a segment is cut) of at most (seq_len - 3) // 2 tokens. An example starts from a
segment A that has a next segment in its document, and reads
`[CLS] A [SEP] B [SEP]`, padded to seq_len, token types 0 up to the first [SEP] and 1
after. B is A's true next segment half the time (`nsp_labels` 0, Hugging Face's
convention) and otherwise a segment of another document (1).

Of the non-special tokens, 15% (rounded, at least one) are chosen for prediction; of
those 80% become [MASK], 10% a random ordinary token and 10% stay. CLS and SEP are the
tokenizer's BOS and EOS, and [MASK] its `<mask>` piece (trained in, see MASK_PIECE).

All randomness comes from grain's `random_map`: a Generator seeded by the seed and the
element's index, so an example is a pure function of (seed, index) and the grain
iterator's position, checkpointed with the model, resumes it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import grain
import numpy as np
import sentencepiece as spm

from jaxlm.data.pipeline import READ_OPTIONS
from jaxlm.errors import JaxlmError

MASK_PIECE = "<mask>"  # trained into the bert tokenizer as a user-defined symbol
MASK_PIECES = (MASK_PIECE, "[MASK]")  # ours, then BERT's own vocabularies'
MASK_RATE, MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.15, 0.8, 0.1
IS_NEXT, NOT_NEXT = 0, 1

Example = dict[str, np.ndarray]


def mask_id(tokenizer: spm.SentencePieceProcessor) -> int:
    """The id of the tokenizer's mask piece; an error if it has none."""
    for piece in MASK_PIECES:
        i = tokenizer.piece_to_id(piece)
        if i != tokenizer.unk_id() and tokenizer.id_to_piece(i) == piece:
            return int(i)
    raise JaxlmError(
        f"the tokenizer has no mask piece ({' or '.join(MASK_PIECES)}), which BERT's MLM "
        "needs; leave tokenizer.path empty to train one that has it"
    )


def special_ids(tokenizer: spm.SentencePieceProcessor) -> tuple[int, int, int]:
    """(CLS, SEP, MASK): BOS and EOS stand for BERT's [CLS] and [SEP]."""
    return tokenizer.bos_id(), tokenizer.eos_id(), mask_id(tokenizer)


def max_segment_len(seq_len: int) -> int:
    return (seq_len - 3) // 2


@dataclass(frozen=True, repr=False)
class Segments:
    """A stream's documents cut into segments; `starts` are the segments with a next one
    in the same document (the examples' A)."""

    tokens: list[np.ndarray]
    doc: np.ndarray  # document index of each segment
    starts: np.ndarray

    def __repr__(self) -> str:
        # grain names each map by str() of its function, a partial holding this: the
        # default repr would print every segment (megabytes per stream).
        return f"Segments({len(self.tokens)} segments, {len(self.starts)} starts)"


def _lines(ids: list[int], newline: int) -> list[list[int]]:
    if newline < 0:
        return [ids]
    lines, line = [], []
    for t in ids:
        line.append(t)
        if t == newline:
            lines.append(line)
            line = []
    return [*lines, line] if line else lines


def _cut(ids: list[int], newline: int, max_len: int) -> list[list[int]]:
    """Whole lines grouped greedily into segments of at most max_len tokens."""
    segments, current = [], []
    for line in _lines(ids, newline):
        for i in range(0, len(line), max_len):
            piece = line[i : i + max_len]
            if current and len(current) + len(piece) > max_len:
                segments.append(current)
                current = []
            current = current + piece
    return [*segments, current] if current else segments


def make_segments(
    docs: Sequence[str], tokenizer: spm.SentencePieceProcessor, seq_len: int
) -> Segments:
    newline = tokenizer.piece_to_id("\n")
    newline = newline if newline != tokenizer.unk_id() else -1
    tokens, doc_of = [], []
    for d, text in enumerate(docs):
        for seg in _cut(tokenizer.encode(text), newline, max_segment_len(seq_len)):
            tokens.append(np.asarray(seg, np.int32))
            doc_of.append(d)
    doc = np.asarray(doc_of, np.int64)
    starts = np.flatnonzero(doc[:-1] == doc[1:]) if len(doc) > 1 else np.zeros(0, np.int64)
    return Segments(tokens, doc, starts)


def _other_segment(segs: Segments, a: int, rng: np.random.Generator) -> int:
    """A random segment of another document (of any but A's next, if there is one doc)."""
    one_doc = segs.doc[0] == segs.doc[-1]
    for _ in range(64):
        k = int(rng.integers(len(segs.tokens)))
        if (segs.doc[k] != segs.doc[a]) or (one_doc and k != a + 1):
            return k
    return (a + 2) % len(segs.tokens)


def mask_tokens(
    tokens: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: int,
    ordinary: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, mlm_mask): 15% of the maskable positions chosen, then 80/10/10."""
    positions = np.flatnonzero(maskable)
    n = max(1, round(MASK_RATE * len(positions))) if len(positions) else 0
    chosen = rng.choice(positions, n, replace=False)
    u = rng.random(n)
    inputs = tokens.copy()
    to_mask = chosen[u < MASK_TOKEN_SHARE]
    to_random = chosen[(u >= MASK_TOKEN_SHARE) & (u < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)]
    inputs[to_mask] = mask
    inputs[to_random] = rng.choice(ordinary, len(to_random))
    chosen_mask = np.zeros(tokens.shape, np.int32)
    chosen_mask[chosen] = 1
    return inputs, chosen_mask


def make_example(
    a: int,
    rng: np.random.Generator,
    *,
    segs: Segments,
    seq_len: int,
    cls: int,
    sep: int,
    mask: int,
    pad: int,
    ordinary: np.ndarray,
) -> Example:
    """The example whose A is segment `a` (an index into segs.tokens)."""
    if rng.random() < 0.5:
        b, label = a + 1, IS_NEXT
    else:
        b, label = _other_segment(segs, a, rng), NOT_NEXT
    seg_a, seg_b = segs.tokens[a], segs.tokens[b]
    real = np.concatenate([[cls], seg_a, [sep], seg_b, [sep]]).astype(np.int32)
    n = len(real)
    tokens = np.full(seq_len, pad, np.int32)
    tokens[:n] = real
    types = np.zeros(seq_len, np.int32)
    types[len(seg_a) + 2 : n] = 1
    maskable = np.zeros(seq_len, bool)
    maskable[1 : len(seg_a) + 1] = True
    maskable[len(seg_a) + 2 : n - 1] = True
    inputs, mlm_mask = mask_tokens(tokens, maskable, rng, mask=mask, ordinary=ordinary)
    return {
        "inputs": inputs,
        "token_types": types,
        "segment_ids": (np.arange(seq_len) < n).astype(np.int32),
        "targets": tokens,
        "mlm_mask": mlm_mask,
        "nsp_labels": np.asarray(label, np.int32),
    }


def ordinary_ids(tokenizer: spm.SentencePieceProcessor) -> np.ndarray:
    """Ids a random replacement may take: all but the special ones."""
    special = {tokenizer.pad_id(), tokenizer.unk_id(), *special_ids(tokenizer)}
    return np.asarray([i for i in range(tokenizer.get_piece_size()) if i not in special])


def mlm_stream(
    docs: Sequence[str],
    tokenizer: spm.SentencePieceProcessor,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """One stream of MLM + NSP batches (the `make_stream` of data/pipeline.py)."""
    segs = make_segments(docs[index::num_streams], tokenizer, seq_len)
    if not len(segs.starts):
        raise JaxlmError(
            f"data: no document of data stream {index} has two segments of at most "
            f"{max_segment_len(seq_len)} tokens to make a next-sentence pair; use longer "
            "documents (data.split) or a longer train.seq_len"
        )
    cls, sep, mask = special_ids(tokenizer)
    build = partial(
        make_example,
        segs=segs,
        seq_len=seq_len,
        cls=cls,
        sep=sep,
        mask=mask,
        pad=tokenizer.pad_id(),
        ordinary=ordinary_ids(tokenizer),
    )
    ds = grain.MapDataset.source(segs.starts.tolist())
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    # Per stream, so that streams mask differently; an index's mask differs per epoch.
    ds = ds.random_map(build, seed=(seed * 1_000_003 + index) % 2**32)
    return ds.to_iter_dataset(READ_OPTIONS).batch(rows, drop_remainder=True)
