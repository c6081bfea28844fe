"""One shard of `jaxlm data prepare`, written in a worker process.

Kept apart from jaxlm/data/shards.py so that spawned workers import only numpy,
sentencepiece and array_record, not grain and JAX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from etils import epath

DTYPE = np.dtype("<i4")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrayrecord"


def _shard_meta(out: epath.Path, index: int) -> epath.Path:
    return out / f"shard-{index:05d}.json"


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


_WORKER_TOKENIZER: spm.SentencePieceProcessor | None = None


def init_worker(model: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = spm.SentencePieceProcessor()
    _WORKER_TOKENIZER.load_from_serialized_proto(model)


def write_shard(out: str, index: int, docs: Sequence[str]) -> dict[str, Any]:
    """Tokenize `docs` into shard `index` (temp name, then renamed) and its counts file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    assert _WORKER_TOKENIZER is not None
    out_dir = epath.Path(out)
    final = out_dir / shard_name(index)
    tmp = out_dir / (final.name + ".tmp")
    writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    tokens = 0
    for ids in _WORKER_TOKENIZER.encode(list(docs)):
        tokens += len(ids)
        writer.write(np.asarray(ids, dtype=DTYPE).tobytes())
    writer.close()
    tmp.replace(final)
    meta = {"file": final.name, "records": len(docs), "tokens": tokens}
    _write_atomic(_shard_meta(out_dir, index), json.dumps(meta).encode())
    return meta
