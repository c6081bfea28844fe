"""A corpus as a random-access sequence of documents, read lazily, with readable errors.

Documents are the unit that packing keeps apart: attention never crosses one. Plain
text is cut at blank lines by default (a speech in Tiny Shakespeare, a paragraph in a
book); JSONL, ArrayRecord and Parquet give one document per record.

`read_documents` opens the files' metadata (an index of byte offsets for text and
JSONL: data/text_index.py; footers for ArrayRecord and Parquet: data/records.py) and
reads a document only when it is indexed, so memory and start-up time do not grow
with the corpus: a grain data source (`__len__`, `__getitem__`) the pipeline slices,
shuffles and repeats by index. SFT and seq2seq records (data/sft.py, data/seq2seq.py)
are still read whole into memory (`jsonl_file_records`).
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from jaxlm.errors import JaxlmError
from jaxlm.paths import glob_files, walk_files

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".array_record", ".parquet")


def list_files(path: str) -> list[epath.Path]:
    """Expand a file, a directory (its text files, sorted) or a glob; local or gs://."""
    p = epath.Path(path)
    if p.is_dir():
        files = sorted(f for f in walk_files(p) if f.suffix in TEXT_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        files = glob_files(path)
    if not files:
        raise JaxlmError(f"data.path: no data files found at {path!r}")
    return files


def _read_text(file: epath.Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise JaxlmError(f"data file {file}: cannot be read ({err.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise JaxlmError(
            f"data file {file}: not valid UTF-8 (byte {err.start}, line {line})"
        ) from None


def split_text(text: str, split: str) -> list[str]:
    if split == "file":
        pieces = [text]
    elif split == "line":
        pieces = text.splitlines()
    else:
        pieces = re.split(r"\n[ \t]*\n", text)
    return [p.strip("\n") for p in pieces if p.strip()]


def jsonl_file_records(path: str, expected: str) -> Iterator[tuple[epath.Path, int, Any]]:
    """(file, line number, parsed record) for every record of the JSONL files at `path`;
    a file of another kind is refused as "data file F: `expected`"."""
    for file in list_files(path):
        if file.suffix not in (".jsonl", ".json"):
            raise JaxlmError(f"data file {file}: {expected}")
        for number, record in jsonl_records(file, _read_text(file)):
            yield file, number, record


def jsonl_records(file: epath.Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every non-blank line; bad JSON is named by line."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise JaxlmError(
                f"data file {file}, line {number}: not valid JSON ({err.msg})"
            ) from None


class FileDocuments(Protocol):
    """One file's documents (data/text_index.py, data/records.py)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> str: ...
    def max_chars(self) -> int | None: ...


class LazySequence(Sequence[str]):
    """A read-only sequence whose slices are views (ranges of indices), not copies."""

    @abc.abstractmethod
    def _get(self, i: int) -> Any:
        """Record `i`, 0 <= i < len(self)."""

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return IndexView(self, range(len(self))[i])
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} of {n}")
        return self._get(i)

    def max_chars(self) -> int | None:
        """An upper bound on the characters of all documents, from metadata (None:
        unknown)."""
        return None


class IndexView(LazySequence):
    """`base[i]` for i in a range: a slice of a lazy sequence."""

    def __init__(self, base: Sequence[Any], indices: range) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def max_chars(self) -> int | None:
        return max_chars(self.base)


def max_chars(docs: Sequence[Any]) -> int | None:
    """An upper bound on the characters of `docs` without reading a lazy source (None:
    unknown); a list's exact count."""
    if isinstance(docs, LazySequence):
        return docs.max_chars()
    return sum(len(d) for d in docs)


class DocumentSource(LazySequence):
    """The documents of several files, in file order, by global record number."""

    def __init__(self, files: list[FileDocuments]) -> None:
        self.files = files
        self.ends = np.cumsum([len(f) for f in files], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _get(self, i: int) -> str:
        f = int(np.searchsorted(self.ends, i, side="right"))
        return self.files[f][i - (int(self.ends[f - 1]) if f else 0)]

    def max_chars(self) -> int | None:
        counts = [f.max_chars() for f in self.files]
        return None if None in counts else sum(counts)


def open_file(file: epath.Path, text_field: str = "text", split: str = "paragraph"):
    """One file's documents, by its suffix."""
    from jaxlm.data.records import ArrayRecordRecords, ParquetRecords
    from jaxlm.data.text_index import TextRecords

    if file.suffix == ".array_record":
        return ArrayRecordRecords(file, text_field)
    if file.suffix == ".parquet":
        return ParquetRecords(file, text_field)
    return TextRecords(file, split, text_field)


def read_documents(path: str, text_field: str = "text", split: str = "paragraph") -> DocumentSource:
    """The documents of the corpus at `path`, in file order, read lazily."""
    source = DocumentSource([open_file(f, text_field, split) for f in list_files(path)])
    if not len(source):
        raise JaxlmError(f"data.path: the corpus at {path!r} is empty (no non-blank text)")
    return source
