"""Pre-tokenized corpora: `jaxlm data prepare` writes ArrayRecord shards of token ids,
and training reads them back lazily.

Tokenizing once, ahead of training, takes the tokenizer off the training hosts' CPUs
and makes a corpus a set of random-access files whose sizes are known from a small
manifest, so a run starts without opening its data. A directory of shards holds:

    manifest.json             format, tokenizer hash, source files, per-shard counts
    tokenizer.model           the sentencepiece model the ids belong to
    shard-00000.arrayrecord   one record per document: its ids as int32 little-endian,
    ...                       without BOS/EOS (the packing adds them, as for text)
    shard-00000.json          a finished shard's counts (kept for resuming)
    prepare.json              the settings a resumed `prepare` must share

Each shard is written under a temporary name and renamed when complete, so a rerun
after an interruption skips the finished shards and writes the same bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
import sentencepiece as spm
from etils import epath
from tqdm import tqdm

from jaxlm.data.shard_writer import DTYPE, _shard_meta, _write_atomic, shard_name
from jaxlm.data.shard_writer import init_worker as _init_worker
from jaxlm.data.shard_writer import write_shard as _write_shard
from jaxlm.data.tokenizer import TOKENIZER_FILE
from jaxlm.errors import JaxlmError

FORMAT = "jaxlm-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "prepare.json"
# A shard closes once it holds this much source text; shards are then a few tens of
# MB of ids, small enough to redo after an interruption.
SHARD_BYTES = 64 << 20


def sha256_file(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def is_shard_dir(path: str) -> bool:
    """Whether `path` is a directory written by `jaxlm data prepare`."""
    try:
        return bool(path) and (epath.Path(path) / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- reading the corpus


def _file_documents(file: epath.Path, raw: bytes, text_field: str, split: str) -> list[str]:
    from jaxlm.data import sources

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise JaxlmError(
            f"data file {file}: not valid UTF-8 (byte {err.start}, line {line})"
        ) from None
    if file.suffix not in (".jsonl", ".json"):
        return sources.split_text(text, split)
    docs = []
    for number, record in sources.jsonl_records(file, text):
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise JaxlmError(
                f"data file {file}, line {number}: no string field {text_field!r} "
                "(set data.text_field)"
            )
        if value.strip():
            docs.append(value)
    return docs


def iter_files(
    path: str, text_field: str, split: str
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """(source entry for the manifest, its documents) one file at a time: only one
    file's text is held at once."""
    from jaxlm.data.sources import list_files, open_file

    for file in list_files(path):
        if file.suffix in (".array_record", ".parquet"):  # records: read one by one
            docs = open_file(file, text_field, split)
            entry = {"path": os.fspath(file), "bytes": file.stat().st_size}
            entry |= {"mtime": file.stat().mtime, "documents": len(docs)}
            yield entry, [doc for doc in docs if doc.strip()]
            continue
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise JaxlmError(f"data file {file}: cannot be read ({err.strerror})") from None
        docs = _file_documents(file, raw, text_field, split)
        entry = {
            "path": os.fspath(file),
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "documents": len(docs),
        }
        yield entry, docs


# ---------------------------------------------------------------- writing shards


def _finished(out: epath.Path, index: int) -> dict[str, Any] | None:
    meta = _shard_meta(out, index)
    if meta.is_file() and (out / shard_name(index)).is_file():
        return json.loads(meta.read_text())
    return None


def _shards(
    files: Iterator[tuple[dict[str, Any], list[str]]], shard_bytes: int, sources: list[dict]
) -> Iterator[tuple[int, list[str]]]:
    """(index, documents) of each shard, in corpus order; a shard closes once it holds
    `shard_bytes` of text (it may span files). `sources` collects the file entries."""
    index, current, size = 0, [], 0
    for entry, docs in files:
        sources.append(entry)
        for doc in docs:
            current.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= shard_bytes:
                yield index, current
                index, current, size = index + 1, [], 0
    if current:
        yield index, current


def tokenizer_model(config: Any, out: epath.Path, resumed: bool) -> bytes:
    """The serialized tokenizer the shards are made with: `tokenizer.path`'s, the one a
    resumed prepare trained (DIR/tokenizer.model), or one trained on a sample of the
    corpus (`tokenizer.sample_docs`/`sample_bytes`) as `jaxlm train` would, so shards
    and a text run of the same config share one tokenizer (and its cache entry)."""
    from jaxlm.data import tasks
    from jaxlm.data.pipeline import split_documents
    from jaxlm.data.sources import read_documents
    from jaxlm.data.tokenizer import cache_dir, cached_tokenizer, load_tokenizer

    tok = config.tokenizer
    if tok.path:
        if tok.path.endswith(".json"):
            raise JaxlmError(
                f"tokenizer.path: {tok.path} is a Hugging Face tokenizer; `jaxlm data prepare` "
                "takes a sentencepiece .model"
            )
        source = epath.Path(tok.path)
        load_tokenizer(source)  # a bad file fails here, readably
        return source.read_bytes()
    if resumed and (out / TOKENIZER_FILE).is_file():
        return (out / TOKENIZER_FILE).read_bytes()
    d = config.data
    train, _ = split_documents(read_documents(d.path, d.text_field, d.split), d.eval_fraction)
    corpus = tasks.tokenizer_corpus(config, train)
    symbols = tasks.tokenizer_symbols(config)
    staged = cache_dir() / "tokenizers" / f"prepare-{os.getpid()}.model"
    cached_tokenizer(corpus, staged, tok.vocab_size, tok.model_type, symbols)
    model = staged.read_bytes()
    staged.unlink()
    return model


def prepare(
    config: Any,
    out: str | os.PathLike,
    workers: int = 1,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `config`'s corpus into shards in `out` and write the manifest.

    Workers tokenize whole shards in parallel; shards are numbered in corpus order and
    their content does not depend on the number of workers. At most two shards per
    worker are in flight, so memory stays bounded by the shard size.
    """
    from jaxlm.model_config import FAMILIES

    if FAMILIES[config.model.family].data != "packed":
        raise JaxlmError(
            f"jaxlm data prepare: model.family={config.model.family} trains on "
            f"{FAMILIES[config.model.family].data} examples; token shards are for decoders "
            "(packed documents)"
        )
    d = config.data
    if is_shard_dir(d.path):
        raise JaxlmError(f"data.path: {d.path} already holds token shards")
    if d.eval_path:
        raise JaxlmError(
            "data.eval_path: token shards hold out by data.eval_fraction; unset data.eval_path"
        )
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_file = out_dir / PLAN
    before = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    plan: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "data": {"path": d.path, "text_field": d.text_field, "split": d.split},
        "tokenizer": dataclasses.asdict(config.tokenizer),
        "seed": config.seed,  # of the tokenizer's sample
        "eval_fraction": d.eval_fraction,  # the sample is of the training split
        "shard_bytes": shard_bytes,
    }
    refusal = JaxlmError(
        f"{out_dir} holds shards of another prepare (other data, tokenizer or shard size, "
        "see its prepare.json); use another --out or empty it"
    )
    if before is not None and {k: v for k, v in before.items() if k != "tokenizer_sha256"} != plan:
        raise refusal
    model = tokenizer_model(config, out_dir, resumed=before is not None)
    tok_sha = hashlib.sha256(model).hexdigest()
    if before is not None and before.get("tokenizer_sha256") != tok_sha:
        raise refusal  # tokenizer.path names a file whose content changed
    plan["tokenizer_sha256"] = tok_sha
    tok_file = out_dir / TOKENIZER_FILE
    if not tok_file.is_file() or tok_file.read_bytes() != model:
        _write_atomic(tok_file, model)
    _write_atomic(plan_file, json.dumps(plan, indent=1).encode())
    (out_dir / MANIFEST).unlink(missing_ok=True)

    sources: list[dict[str, Any]] = []
    metas: dict[int, dict[str, Any]] = {}
    shards = _shards(iter_files(d.path, d.text_field, d.split), shard_bytes, sources)
    bar = tqdm(desc="prepare", unit="doc", disable=not progress, dynamic_ncols=True)
    skipped = 0
    if workers <= 1:
        _init_worker(model)
        for index, docs in shards:
            meta = _finished(out_dir, index)
            if meta is None:
                meta = _write_shard(os.fspath(out_dir), index, docs)
            else:
                skipped += 1
            metas[index] = meta
            bar.update(len(docs))
    else:
        ctx = multiprocessing.get_context("spawn")  # safe beside JAX's threads
        with cf.ProcessPoolExecutor(workers, ctx, _init_worker, (model,)) as pool:
            pending: dict[cf.Future, int] = {}

            def drain(limit: int) -> None:
                while len(pending) > limit:
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        meta = fut.result()
                        metas[pending.pop(fut)] = meta
                        bar.update(meta["records"])

            for index, docs in shards:
                meta = _finished(out_dir, index)
                if meta is not None:
                    metas[index] = meta
                    skipped += 1
                    bar.update(len(docs))
                    continue
                pending[pool.submit(_write_shard, os.fspath(out_dir), index, docs)] = index
                drain(2 * workers)
            drain(0)
    bar.close()
    if not metas:
        raise JaxlmError(f"data.path: the corpus at {d.path!r} is empty (no non-blank text)")
    shard_list = [metas[i] for i in range(len(metas))]
    sp = spm.SentencePieceProcessor()
    sp.load_from_serialized_proto(model)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "record": "token ids of one document, int32 little-endian, no BOS/EOS",
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tok_sha,
            "pieces": sp.get_piece_size(),
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
        },
        "data": plan["data"],
        "sources": sources,
        "shards": shard_list,
        "records": sum(s["records"] for s in shard_list),
        "tokens": sum(s["tokens"] for s in shard_list),
        "resumed_shards": skipped,
    }
    _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


# ---------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class Shards:
    """A prepared directory, from its manifest alone (no shard is opened)."""

    path: epath.Path
    manifest: dict[str, Any]

    @property
    def tokenizer_file(self) -> epath.Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def __len__(self) -> int:
        return int(self.manifest["records"])

    def source(self) -> grain.MapDataset:
        """The documents' ids, lazily: ArrayRecord readers open on first access and the
        `[0:N]` instructions spare grain from opening each file to count its records."""
        paths = [f"{self.path / s['file']}[0:{s['records']}]" for s in self.manifest["shards"]]
        return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(
            decode_record
        )


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=DTYPE)


def open_shards(path: str) -> Shards:
    """The manifest of a prepared directory; a wrong format or version is one line."""
    root = epath.Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JaxlmError(f"{root / MANIFEST}: not a readable manifest ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise JaxlmError(
            f"{root / MANIFEST}: format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this jaxlm reads {FORMAT!r} version {VERSION}"
        )
    return Shards(root, manifest)


def check_tokenizer(shards: Shards, tokenizer_file: epath.Path, what: str) -> None:
    """Refuse ids made by another tokenizer than the run's (`what` names the run's)."""
    sha = sha256_file(tokenizer_file)
    if sha != shards.tokenizer_sha256:
        raise JaxlmError(
            f"data.path: the shards in {shards.path} were made by another tokenizer than "
            f"{what} (sha256 {shards.tokenizer_sha256[:12]}... in the manifest, "
            f"{sha[:12]}... here); re-run `jaxlm data prepare` or drop tokenizer.path"
        )


def ids_example(bos: int, eos: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A document's ids as the packing takes them: `[BOS] ids [EOS]`, shifted."""
    full = np.concatenate([[bos], ids, [eos]]).astype(np.int32)
    return {"inputs": full[:-1], "targets": full[1:]}
