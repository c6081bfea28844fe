"""ArrayRecord and Parquet files as random-access documents, read one at a time.

- `.array_record` (grain's own format): one record per document, each a UTF-8 JSON
  object whose `data.text_field` string is the document (the JSONL convention, so a
  JSONL corpus converts record for record). Counts come from each file's footer.
- `.parquet`: one row per document, the string column `data.text_field`. The file's
  metadata gives the rows per row group; a read decodes only the row group holding the
  row (one column), and the last row groups read are kept, so reading in order decodes
  each once. A global shuffle over Parquet decodes a row group per document: for long
  runs convert to ArrayRecord, whose records are read one by one.

Parquet opens local or gs:// paths through etils.epath. ArrayRecord goes through
array_record's own file layer, not gcsfs, so gs:// ArrayRecord is untested here (the
Cloud Storage emulator cannot serve it); on a pod, read it from a gcsfuse mount.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from etils import epath

from jaxlm.data.text_index import json_field
from jaxlm.errors import JaxlmError


class ArrayRecordRecords:
    """The documents of one .array_record file."""

    def __init__(self, file: epath.Path, text_field: str = "text") -> None:
        import grain

        self.file, self.text_field = file, text_field
        try:
            self.source = grain.sources.ArrayRecordDataSource([str(file)])
            self.length = len(self.source)
        except Exception as err:  # array_record raises plain RuntimeError/ValueError
            raise JaxlmError(f"data file {file}: not a readable ArrayRecord file ({err})") from None
        if self.length:
            self[0]  # a wrong text field fails here, before any training

    def __len__(self) -> int:
        return self.length

    def max_chars(self) -> None:
        """Unknown without reading: records may be compressed."""
        return None

    def __getitem__(self, i: int) -> str:
        raw = self.source[int(i)]
        where = f"data file {self.file}, record {int(i)}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise JaxlmError(f"{where}: not valid UTF-8 (byte {err.start})") from None
        return json_field(text, self.text_field, where)


class ParquetRecords:
    """The documents of one .parquet file: column `text_field`, row by row."""

    CACHED_GROUPS = 2

    def __init__(self, file: epath.Path, text_field: str = "text") -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.file, self.text_field = file, text_field
        try:
            self._handle = file.open("rb")
            self.parquet = pq.ParquetFile(self._handle)
        except (OSError, pa.ArrowException) as err:
            raise JaxlmError(f"data file {file}: not a readable Parquet file ({err})") from None
        schema = self.parquet.schema_arrow
        if text_field not in schema.names:
            raise JaxlmError(
                f"data file {file}: no column {text_field!r} (columns: "
                f"{', '.join(schema.names)}; set data.text_field)"
            )
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise JaxlmError(
                f"data file {file}: column {text_field!r} holds {kind}, not strings "
                "(set data.text_field)"
            )
        meta = self.parquet.metadata
        self.column = schema.get_field_index(text_field)
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.ends = np.cumsum(rows, dtype=np.int64)
        self._cache: OrderedDict[int, list] = OrderedDict()
        self._lock = threading.Lock()  # one file handle, read by grain's threads

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def max_chars(self) -> int:
        """The text column's uncompressed size, from the file's metadata."""
        meta = self.parquet.metadata
        return sum(
            meta.row_group(g).column(self.column).total_uncompressed_size
            for g in range(meta.num_row_groups)
        )

    def _group(self, g: int) -> list:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            table = self.parquet.read_row_group(g, columns=[self.text_field])
            values = table.column(0).to_pylist()
            self._cache[g] = values
            if len(self._cache) > self.CACHED_GROUPS:
                self._cache.popitem(last=False)
            return values

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        g = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[g - 1]) if g else 0
        value = self._group(g)[i - start]
        if value is None:
            raise JaxlmError(
                f"data file {self.file}, row {i}: column {self.text_field!r} is null "
                "(set data.text_field)"
            )
        return value
