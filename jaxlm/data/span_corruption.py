"""T5's span corruption: the objective a T5 is pretrained with on plain text.

As in the T5 paper and `t5.data.preprocessors.span_corruption`: a stream's documents
are tokenized and concatenated (joined by the newline piece when the tokenizer has
one) and cut into chunks of `tokens_length` tokens. In a chunk of L tokens,
round(L * noise_density) are noise, in round(noise / mean_noise_span_length) spans;
the noise and non-noise lengths are each cut into that many non-empty spans at random
(`random_segmentation`) and interleaved, non-noise first (T5 without `random_roll`:
a chunk starts with kept tokens and ends in noise). The encoder reads the chunk
with each noise span replaced by one sentinel, the decoder predicts each sentinel
followed by the span it hid; both end in EOS:

    tokens   a b c D E f g H i j K L
    inputs   a b c <extra_id_0> f g <extra_id_1> i j <extra_id_2> EOS
    targets  <extra_id_0> D E <extra_id_1> H <extra_id_2> K L EOS

`tokens_length` is T5's `random_spans_helper`: the longest chunk whose corrupted
inputs fit `train.seq_len` and whose targets fit `data.target_len` (0 = seq_len), so
nothing is truncated; only a stream's last, shorter chunk is padded.

Sentinels are pieces `<extra_id_K>` looked up by name, so a Hugging Face T5
tokenizer's own (counting down from the top of its vocabulary) work as they are. When
jaxlm trains the tokenizer it adds as many as a chunk can have spans as user-defined
pieces, listed so that `<extra_id_0>` has the highest id of them, as in T5.

All randomness comes from grain's `random_map` (a Generator seeded by the seed and the
element's index), so an example is a pure function of (seed, index) and the
checkpointed iterator position resumes the stream exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import grain
import numpy as np
import sentencepiece as spm

from jaxlm.data.pipeline import READ_OPTIONS
from jaxlm.errors import JaxlmError

SENTINEL = "<extra_id_{}>"
NOISE_DENSITY, MEAN_NOISE_SPAN_LENGTH = 0.15, 3.0  # the T5 paper's

Example = dict[str, np.ndarray]


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 rounds them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, min(spans, noise, length - noise)  # every span non-empty


def corrupted_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, of a corrupted chunk of `length` tokens."""
    noise, spans = span_counts(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def tokens_length(
    inputs_length: int, targets_length: int, noise_density: float, mean_span: float
) -> int:
    """The longest chunk whose corrupted inputs and targets fit the encoder and decoder
    lengths (T5's `random_spans_helper`, with the targets bounded too); 0 if none does.
    Both corrupted lengths grow with the chunk's, so the first that overflows ends it."""
    length = 1
    while True:
        i, t = corrupted_lengths(length + 1, noise_density, mean_span)
        if i > inputs_length or t > targets_length:
            return length if length >= 2 else 0
        length += 1


def sentinel_pieces(count: int) -> tuple[str, ...]:
    """`<extra_id_{count-1}>` .. `<extra_id_0>`: trained in this order, extra_id_0 gets
    the highest id of them, as in T5's vocabularies."""
    return tuple(SENTINEL.format(k) for k in reversed(range(count)))


def sentinel_ids(tokenizer: spm.SentencePieceProcessor, count: int) -> np.ndarray:
    """The ids of `<extra_id_0>` .. `<extra_id_{count-1}>`; an error if one is missing."""
    ids = []
    for k in range(count):
        piece = SENTINEL.format(k)
        i = tokenizer.piece_to_id(piece)
        if i == tokenizer.unk_id() or tokenizer.id_to_piece(i) != piece:
            raise JaxlmError(
                f"the tokenizer has no sentinel piece {piece!r}: span corruption at this "
                f"train.seq_len needs {count} (<extra_id_0> ..); leave tokenizer.path empty "
                "to train a tokenizer that has them"
            )
        ids.append(i)
    return np.asarray(ids, np.int32)


def random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `segments` non-empty parts of `items`, all cuts equally likely (T5's
    `_random_segmentation`: segments - 1 distinct cut points among items - 1)."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """A boolean mask of `length` (>= 2): True on the noise tokens, in spans."""
    noise, spans = span_counts(length, noise_density, mean_span)
    noise_lengths = random_segmentation(noise, spans, rng)
    keep_lengths = random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], spans)
    return np.repeat(is_noise, interleaved)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """`tokens` with the k-th span of True in `mask` replaced by one `sentinels[k]`."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span = np.cumsum(starts) - 1
    if span[-1] >= len(sentinels):
        raise JaxlmError(f"span corruption: {span[-1] + 1} spans, {len(sentinels)} sentinels")
    return np.where(starts, sentinels[np.maximum(span, 0)], tokens)[~mask | starts]


def corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), without EOS: each noise span becomes one sentinel in the
    inputs; the targets replace the non-noise spans instead (T5's
    `nonnoise_span_to_unique_sentinel`), so, as the mask starts with non-noise, each
    sentinel is followed by the span it stands for."""
    inputs = _replace_spans(tokens, noise_mask, sentinels)
    targets = _replace_spans(tokens, ~noise_mask, sentinels)
    return inputs.astype(np.int32), targets.astype(np.int32)


def _pad(ids: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(length, pad, np.int32)
    out[: len(ids)] = ids
    return out, (np.arange(length) < len(ids)).astype(np.int32)


def make_example(
    start: int,
    rng: np.random.Generator,
    *,
    tokens: np.ndarray,
    length: int,
    noise_density: float,
    mean_span: float,
    sentinels: np.ndarray,
    src_len: int,
    tgt_len: int,
    bos: int,
    eos: int,
    pad: int,
) -> Example:
    """The example of the chunk at `start`: seq2seq's keys (data/seq2seq.py), so the
    seq2seq objective trains on it unchanged."""
    chunk = tokens[start : start + length]
    mask = random_spans_noise_mask(len(chunk), noise_density, mean_span, rng)
    src, tgt = corrupt(chunk, mask, sentinels)
    src, tgt = np.append(src, eos), np.append(tgt, eos)
    inputs, input_mask = _pad(src, src_len, pad)
    targets, target_mask = _pad(tgt, tgt_len, pad)
    decoder_inputs, _ = _pad(np.concatenate([[bos], tgt[:-1]]), tgt_len, pad)
    return {
        "inputs": inputs,
        "input_mask": input_mask,
        "decoder_inputs": decoder_inputs,
        "targets": targets,
        "target_mask": target_mask,
    }


def concat_tokens(docs: Sequence[str], tokenizer: spm.SentencePieceProcessor) -> np.ndarray:
    """The documents' tokens end to end, joined by the newline piece if there is one."""
    newline = tokenizer.piece_to_id("\n")
    sep = [newline] if newline != tokenizer.unk_id() else []
    ids: list[int] = []
    for i, doc in enumerate(docs):
        ids.extend([*(sep if i else []), *tokenizer.encode(doc)])
    return np.asarray(ids, np.int32)


def chunk_length(seq_len: int, target_len: int, noise_density: float, mean_span: float) -> int:
    """`tokens_length` for an encoder of seq_len and a decoder of target_len (0 =
    seq_len); an error naming the keys if no chunk fits."""
    length = tokens_length(seq_len, target_len or seq_len, noise_density, mean_span)
    if length < 2:
        raise JaxlmError(
            f"data.target_len: {target_len or seq_len} decoder tokens cannot hold the targets "
            f"of span corruption on train.seq_len={seq_len}; raise data.target_len"
        )
    return length


def span_corruption_stream(
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
    target_len: int = 0,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> grain.IterDataset:
    """One stream of span-corruption batches (the `make_stream` of data/pipeline.py):
    inputs of `seq_len` tokens, targets of `target_len` (0 = seq_len)."""
    length = chunk_length(seq_len, target_len, noise_density, mean_noise_span_length)
    tokens = concat_tokens(docs[index::num_streams], tokenizer)
    starts = [s for s in range(0, len(tokens), length) if len(tokens) - s >= 2]
    if not starts:
        raise JaxlmError(f"data: stream {index} has no text to corrupt; add data")
    spans = span_counts(length, noise_density, mean_noise_span_length)[1]
    build = partial(
        make_example,
        tokens=tokens,
        length=length,
        noise_density=noise_density,
        mean_span=mean_noise_span_length,
        sentinels=sentinel_ids(tokenizer, spans),
        src_len=seq_len,
        tgt_len=target_len or seq_len,
        bos=tokenizer.bos_id() if tokenizer.bos_id() >= 0 else tokenizer.pad_id(),
        eos=tokenizer.eos_id(),
        pad=tokenizer.pad_id(),
    )
    ds = grain.MapDataset.source(starts)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    # Per stream, so that streams corrupt differently; a chunk's spans differ per epoch.
    ds = ds.random_map(build, seed=(seed * 1_000_003 + index) % 2**32)
    return ds.to_iter_dataset(READ_OPTIONS).batch(rows, drop_remainder=True)
