"""Plain text and JSONL files as random-access records, through an index of byte offsets.

A text file is cut into documents as `sources.split_text` cuts it (`data.split`:
paragraphs at blank lines, lines, or the whole file), a JSONL file into its non-blank
lines. The cut is found once, by scanning the file in chunks of `CHUNK` bytes with
NumPy, so the memory it takes does not depend on the file's size; it is kept as an
`(n, 3)` int64 array of [start byte, end byte, line number (JSONL; 0 for text)]
per record. Reading record
`i` is then a seek, a read of its bytes and a decode.

Where the index lives: `JAXLM_CACHE_DIR/text-index/` (see data/tokenizer.py), named by
a hash of the file's path, size, modification time and the split. Not beside the data:
data directories are often read-only or a shared bucket several hosts would race to
write, and a key of size and mtime makes a rewritten file get a new index instead of
a stale one. Each host indexes the files it reads once; at pod scale, convert text to
ArrayRecord once instead (one record per document: data/records.py).

Blank means no byte other than ASCII whitespace; lines end at "\\n" (a "\\r" before it
is dropped from line and JSONL records). Paragraph documents follow `split_text`
exactly: split at "\\n[ \\t]*\\n", stripped of surrounding newlines.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import numpy as np
from etils import epath

from jaxlm.errors import JaxlmError

CHUNK = 4 << 20
_OPEN = threading.local()
INDEX_VERSION = 1
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def index_file(file: epath.Path, split: str) -> epath.Path:
    """Where `file`'s index for `split` is cached (see the module docstring)."""
    from jaxlm.data.tokenizer import cache_dir

    stat = file.stat()
    key = f"{INDEX_VERSION}:{file}:{stat.length}:{stat.mtime}:{split}"
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return epath.Path(cache_dir()) / "text-index" / f"{name}.npy"


def load_index(file: epath.Path, split: str) -> np.ndarray:
    """The record offsets of `file` (built and cached on first use), memory-mapped."""
    path = index_file(file, split)
    if not path.is_file():
        index = build_index(file, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, index)
        tmp.replace(path)  # atomic: processes indexing the same file never see half of one
    return np.load(os.fspath(path), mmap_mode="r")


def build_index(file: epath.Path, split: str) -> np.ndarray:
    """Scan `file` once: [start, end, line] of every record (split: paragraph | line |
    file | jsonl). The file must be UTF-8; the first bad byte is named with its line.

    The buffer holds one chunk and the unfinished last line; work is per line (NumPy),
    and a paragraph spanning chunks is carried as state (where its text starts and
    ends, whether it has any), not as bytes.
    """
    out: list[np.ndarray] = []
    base, line_no, carry = 0, 1, b""
    run = 0  # capable blank lines just before this segment (paragraph separators)
    open_first, open_last, open_has = -1, -1, False  # the unfinished piece
    try:
        handle = file.open("rb")
    except OSError as err:
        raise JaxlmError(f"data file {file}: cannot be read ({err.strerror})") from None
    with handle:
        while True:
            chunk = handle.read(CHUNK)
            eof = not chunk
            buf = carry + chunk
            cut = len(buf) if eof else buf.rfind(b"\n") + 1
            if cut == 0 and not eof:
                carry = buf
                continue
            seg, carry = buf[:cut], buf[cut:]
            if not seg.isascii():
                try:
                    seg.decode("utf-8")
                except UnicodeDecodeError as err:
                    line = line_no + seg[: err.start].count(b"\n")
                    raise JaxlmError(
                        f"data file {file}: not valid UTF-8 (byte {base + err.start}, line {line})"
                    ) from None
            arr = np.frombuffer(seg, dtype=np.uint8)
            nl = np.flatnonzero(arr == 10)
            starts = np.concatenate([[0], nl + 1])
            ends = np.concatenate([nl, [len(arr)]])
            if not eof or starts[-1] == len(arr):  # no unterminated last line
                starts, ends = starts[:-1], ends[:-1]
            # Per line: any non-whitespace byte, and (paragraphs) only spaces and tabs.
            # A line whose first byte is text settles both; the rest are looked at.
            n = len(starts)
            has = np.ones(n, dtype=bool)
            only_st = np.zeros(n, dtype=bool)
            if n:
                look = np.flatnonzero(_WS[arr[np.minimum(starts, len(arr) - 1)]] | (ends == starts))
                for k in look.tolist():
                    line = seg[starts[k] : ends[k]]
                    has[k] = bool(line.strip())
                    only_st[k] = not line.strip(b" \t")
            if split in ("line", "jsonl"):
                e = ends.copy()
                cr = e > starts
                cr[cr] = arr[e[cr] - 1] == 13
                e[cr] -= 1  # "\r\n"
                lines = np.arange(len(starts)) + line_no
                out.append(np.stack([starts + base, e + base, lines], axis=1)[has])
            else:
                if split == "paragraph":
                    capable = only_st & (ends < len(arr))  # blank, and ends in "\n"
                    if base == 0 and n:
                        capable[0] = False  # no "\n" before the file's first line
                    idx = np.arange(n)
                    last_not = np.maximum.accumulate(np.where(~capable, idx, -1 - run))
                    offset = idx - last_not - 1
                    sep = np.flatnonzero(capable & (offset % 2 == 0))
                    run = int(offset[-1] + 1) if n and capable[-1] else 0 if n else run
                else:
                    sep = np.zeros(0, dtype=np.int64)
                # Pieces as line ranges: a separator line ends one and starts the next.
                first_line = np.concatenate([[0], sep + 1])
                last_line = np.concatenate([sep - 1, [n - 1]])
                nonempty = np.flatnonzero(ends > starts)
                fi = np.searchsorted(nonempty, first_line)
                la = np.searchsorted(nonempty, last_line, side="right") - 1
                valid = (fi < len(nonempty)) & (la >= 0)
                valid[valid] &= nonempty[fi[valid]] <= last_line[valid]
                cum = np.concatenate([[0], np.cumsum(has, dtype=np.int64)])
                any_text = cum[np.maximum(last_line + 1, 0)] > cum[np.minimum(first_line, n)]
                p_first = np.full(len(first_line), -1, dtype=np.int64)
                p_last = np.full(len(first_line), -1, dtype=np.int64)
                p_first[valid] = starts[nonempty[fi[valid]]] + base
                p_last[valid] = ends[nonempty[la[valid]]] + base
                # The first piece continues the open one.
                if open_first >= 0:
                    p_first[0] = open_first
                    if p_last[0] < 0:
                        p_last[0] = open_last
                any_text[0] |= open_has
                closed = len(first_line) if eof else len(first_line) - 1
                keep = any_text[:closed] & (p_first[:closed] >= 0)
                rows = np.stack([p_first[:closed], p_last[:closed], np.zeros(closed, np.int64)], 1)
                out.append(rows[keep])
                if not eof:
                    open_first, open_last = int(p_first[-1]), int(p_last[-1])
                    open_has = bool(any_text[-1])
            line_no += len(nl)
            base += len(seg)
            if eof:
                break
    index = np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)
    return index.astype(np.int64)


class TextRecords:
    """The documents of one .txt or .jsonl file, read one at a time through its index."""

    def __init__(self, file: epath.Path, split: str, text_field: str = "text") -> None:
        self.file, self.text_field = file, text_field
        self.jsonl = file.suffix in (".jsonl", ".json")
        self.index = load_index(file, "jsonl" if self.jsonl else split)
        if self.jsonl and len(self):
            self[0]  # a wrong text field fails here, before any training

    def __len__(self) -> int:
        return len(self.index)

    def max_chars(self) -> int:
        """At most this many characters: the file's size, from its metadata."""
        return self.file.stat().length

    def _read(self, start: int, end: int) -> bytes:
        # One open file per thread (grain reads from several), kept while it reads
        # the same file: a shuffle over many files never holds them all open.
        held = getattr(_OPEN, "file", None)
        if held is None or held[0] is not self:
            if held is not None:
                held[1].close()
            _OPEN.file = held = (self, self.file.open("rb"))
        held[1].seek(start)
        return held[1].read(end - start)

    def __getitem__(self, i: int) -> str:
        start, end, line = (int(v) for v in self.index[i])
        text = self._read(start, end).decode("utf-8")
        if not self.jsonl:
            return text
        return json_field(text, self.text_field, f"data file {self.file}, line {line}")


def json_field(text: str | bytes, field: str, where: str) -> str:
    """The string `field` of a JSON object, with errors naming `where`."""
    try:
        record: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise JaxlmError(f"{where}: not valid JSON ({err.msg})") from None
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise JaxlmError(f"{where}: no string field {field!r} (set data.text_field)")
    return value
