"""Training on token shards and on weighted mixtures of sources.

A source here is a lazy `grain.MapDataset` of examples (`inputs`/`targets` of one
document): ids read from `jaxlm data prepare` shards, or text tokenized on the fly.
Each source is packed on its own (no row mixes two sources' documents), and the
packed rows of the sources are interleaved by grain's `IterDataset.mix` in the
proportions of their weights, then batched. All of this runs inside each of
`make_dataset`'s per-process streams, so the sharding over hosts and the checkpointed
per-stream iterator state (which holds every source's position) work as for text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grain
from etils import epath

from jaxlm.data import shards as shard_io
from jaxlm.data.pipeline import READ_OPTIONS, _rename, _tokenize, split_documents
from jaxlm.data.tokenizer import TOKENIZER_FILE, load_tokenizer, run_tokenizer
from jaxlm.errors import JaxlmError


def packed_rows(
    examples: grain.MapDataset,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """Stream `index`'s packed rows (unbatched): the records `index::num_streams`,
    shuffled by index (a new order each epoch), packed as data/pipeline.py packs text."""
    ds = examples[index::num_streams]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        ds.to_iter_dataset(READ_OPTIONS),
        length_struct={"inputs": seq_len, "targets": seq_len},
    )
    return packed.map(_rename)


def examples_stream(
    examples: grain.MapDataset,
    tokenizer: Any,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """`make_dataset`'s `make_stream` for one lazy source of examples (token shards)."""
    del tokenizer  # the examples are tokenized already
    rows_ds = packed_rows(
        examples, index, num_streams, seq_len=seq_len, seed=seed, shuffle=shuffle, repeat=repeat
    )
    return rows_ds.batch(rows, drop_remainder=True)


@dataclass(frozen=True)
class Mixture:
    """Sources of examples and their weights; `len` is the smallest source's, which
    `make_dataset` checks against the number of streams."""

    sources: Sequence[grain.MapDataset]
    weights: Sequence[float]

    def __len__(self) -> int:
        return min(len(s) for s in self.sources)


def mixture_stream(
    mixture: Mixture,
    tokenizer: Any,
    index: int,
    num_streams: int,
    *,
    seq_len: int,
    rows: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """`make_dataset`'s `make_stream` for a mixture: each source packed on its own
    (with its own shuffle seed), their rows mixed by weight, then batched."""
    del tokenizer
    parts, weights = [], []
    for k, (source, weight) in enumerate(zip(mixture.sources, mixture.weights, strict=True)):
        if weight <= 0:
            continue
        kw = dict(seq_len=seq_len, seed=seed + k, shuffle=shuffle, repeat=repeat)
        parts.append(packed_rows(source, index, num_streams, **kw))
        weights.append(weight)
    mixed = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
    return mixed.batch(rows, drop_remainder=True)


# ---------------------------------------------------------------- a run's data


def uses_token_data(config: Any) -> bool:
    """Whether a run reads token shards or a mixture (else the text path of tasks.py)."""
    return bool(config.data.mixture) or shard_io.is_shard_dir(config.data.path)


def split_source(source: grain.MapDataset, eval_fraction: float, what: str):
    """Train and eval parts of a source, by `pipeline.split_documents`'s rule (one
    record in every 1/eval_fraction held out, chosen by record number: nothing is read),
    so shards and the text they were made from split alike."""
    try:
        train, held = split_documents(source, eval_fraction)
    except JaxlmError as err:
        raise JaxlmError(f"{what}: {str(err).removeprefix('data.path: ')}") from None
    return grain.MapDataset.source(train), grain.MapDataset.source(held)


def _check_shard_tokenizer(config: Any, run_dir: epath.Path, shard_dirs: list[shard_io.Shards]):
    """Refuse shards made by another tokenizer than the run will use (the run dir's
    copy, else `tokenizer.path`, else the first shards' own), before anything is
    written or compiled."""
    if config.tokenizer.path.endswith(".json"):
        raise JaxlmError(
            "tokenizer.path: token shards and mixtures take a sentencepiece .model, "
            f"not {config.tokenizer.path}"
        )
    local = run_dir / TOKENIZER_FILE
    if local.is_file():
        given, what = local, f"the run directory's {local}"
    elif config.tokenizer.path:
        given = epath.Path(config.tokenizer.path)
        load_tokenizer(given)  # a bad file fails here, readably
        what = f"tokenizer.path {given}"
    elif shard_dirs:
        given, what = shard_dirs[0].tokenizer_file, f"{shard_dirs[0].tokenizer_file}"
    else:
        return
    for s in shard_dirs:
        shard_io.check_tokenizer(s, given, what)


def token_data(config: Any, run_dir: epath.Path):
    """(train, held_out, tokenizer, make_stream) for a run on token shards or a mixture:
    the first two are what `make_dataset`/`eval_batches` take as `docs`."""
    from jaxlm.data.sources import read_documents
    from jaxlm.data.tasks import sample_examples
    from jaxlm.model_config import FAMILIES

    d = config.data
    if d.eval_path:
        raise JaxlmError(
            "data.eval_path: token shards and data.mixture hold out by data.eval_fraction; "
            "unset data.eval_path"
        )
    if FAMILIES[config.model.family].data != "packed":
        raise JaxlmError(
            f"data: model.family={config.model.family} cannot train on token shards or "
            "data.mixture (they hold packed decoder documents)"
        )
    entries = list(d.mixture) or [None]
    paths = [e.path if e is not None else d.path for e in entries]
    where = [
        f"data.mixture[{i}] ({e.path})" if e is not None else "data.path"
        for i, e in enumerate(entries)
    ]
    shard_dirs, texts, kinds = [], [], []
    for path, what in zip(paths, where, strict=True):
        if shard_io.is_shard_dir(path):
            s = shard_io.open_shards(path)
            if len(s) == 0:
                raise JaxlmError(f"{what}: the source is empty (no documents)")
            most = s.manifest["tokens"] + 2 * len(s)  # with BOS/EOS, eval split included
            need = config.train.batch_size * config.train.seq_len
            if not d.mixture and most < need:
                raise JaxlmError(
                    f"{what}: the shards in {s.path} hold at most {most} tokens, fewer than "
                    f"one batch of {need}; add text or lower train.batch_size/train.seq_len"
                )
            shard_dirs.append(s)
            kinds.append(s)
        else:
            try:
                docs = read_documents(path, d.text_field, d.split)
            except JaxlmError as err:  # "data.path: ..." or "data file F: ..."
                if "is empty" in str(err):
                    raise JaxlmError(f"{what}: the source is empty (no non-blank text)") from None
                raise JaxlmError(f"{what}: {str(err).removeprefix('data.path: ')}") from None
            texts.append(docs)
            kinds.append(docs)
    _check_shard_tokenizer(config, run_dir, shard_dirs)

    def corpus() -> list[str]:  # a seeded sample of each text source's training split
        f = config.data.eval_fraction
        return [d for t in texts for d in sample_examples(config, split_documents(t, f)[0])]

    default = shard_dirs[0].tokenizer_file if shard_dirs else None
    tokenizer = run_tokenizer(config.tokenizer, run_dir, corpus, default=default)
    bos = tokenizer.bos_id() if tokenizer.bos_id() >= 0 else tokenizer.eos_id()
    train, held = [], []
    for kind, what in zip(kinds, where, strict=True):
        if isinstance(kind, shard_io.Shards):
            source = kind.source().map(partial(shard_io.ids_example, bos, tokenizer.eos_id()))
        else:
            source = grain.MapDataset.source(kind).map(partial(_tokenize, tokenizer))
        a, b = split_source(source, d.eval_fraction, what)
        train.append(a)
        held.append(b)
    if not d.mixture:
        return train[0], held[0], tokenizer, examples_stream
    weights = [e.weight for e in d.mixture]
    return Mixture(train, weights), Mixture(held, weights), tokenizer, mixture_stream
