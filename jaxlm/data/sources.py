"""Reading a corpus into a list of documents, with readable errors for bad input.

Documents are the unit that packing keeps apart: attention never crosses one. Plain
text is cut at blank lines by default (a speech in Tiny Shakespeare, a paragraph in a
book); JSONL gives one document per record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from etils import epath

from jaxlm.errors import JaxlmError
from jaxlm.paths import glob_files, walk_files

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


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


def _jsonl_documents(file: epath.Path, text: str, field: str) -> list[str]:
    docs = []
    for number, record in jsonl_records(file, text):
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise JaxlmError(
                f"data file {file}, line {number}: no string field {field!r} (set data.text_field)"
            )
        if value.strip():
            docs.append(value)
    return docs


def read_documents(path: str, text_field: str = "text", split: str = "paragraph") -> list[str]:
    """All documents of the corpus at `path`, in file order."""
    docs: list[str] = []
    for file in list_files(path):
        text = _read_text(file)
        if file.suffix in (".jsonl", ".json"):
            docs.extend(_jsonl_documents(file, text, text_field))
        else:
            docs.extend(split_text(text, split))
    if not docs:
        raise JaxlmError(f"data.path: the corpus at {path!r} is empty (no non-blank text)")
    return docs
