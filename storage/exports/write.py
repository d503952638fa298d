"""Writing an export's files batch by batch into the output store (``ObjectStore.open_write``), so the output is
never held whole: Parquet in row groups of a fixed ``ROW_GROUP_ROWS`` rows, JSONL as each batch's lines.

**Bytes.** Parquet's writer needs a row group whole, so a row group is the unit held in memory. Rows are
buffered until ``ROW_GROUP_ROWS`` have arrived and written as one contiguous table (the batches concatenated
into one chunk per column), which is exactly how ``pq.write_table`` cuts a whole single-chunk table with
``row_group_size=ROW_GROUP_ROWS``. So the file's bytes depend only on its rows, never on how the exporter
batched them, and an export of at most ``ROW_GROUP_ROWS`` rows is byte-identical to the one-row-group file
``storage.release.parquet_bytes`` writes for the whole table (tests/test_export_stream.py checks both).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.exports.base import ExportBatch, ExportStream
from storage.objectstore import ObjectStore, ObjectWriter

__all__ = ["ROW_GROUP_ROWS", "PARQUET_OPTIONS", "ParquetStream", "StreamedFile", "write_stream"]

# Rows per Parquet row group: the output held in memory at once (64Ki rows of a step export: ~30-60 MB of
# Arrow columns at the benchmark's widths). Changing it changes the bytes of every export above it.
ROW_GROUP_ROWS = 1 << 16
# What `storage.release.parquet_bytes` writes with: the same options give the same bytes.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_statistics": True}
# pyarrow's small writes (page headers, footers) are coalesced before they cross into Python.
_SINK_BUFFER = 1 << 20


@dataclass(frozen=True)
class StreamedFile:
    """What ``export.json`` records of a file: its sha256, size and rows, counted while it streamed."""

    sha256: str
    bytes: int
    rows: int

    def record(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "rows": self.rows}


class ParquetStream:
    """A Parquet file written row group by row group: ``add`` batches of any size, ``close`` at the end."""

    def __init__(self, out: ObjectWriter, schema: pa.Schema, row_group_rows: int | None = None) -> None:
        self.schema = schema
        self.rows = 0
        self._group = row_group_rows or ROW_GROUP_ROWS
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink = pa.BufferedOutputStream(pa.PythonFile(out, mode="w"), _SINK_BUFFER)
        self._writer = pq.ParquetWriter(self._sink, schema, **PARQUET_OPTIONS)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            if b.num_rows:
                self._pending.append(b)
                self._pending_rows += b.num_rows
        while self._pending_rows >= self._group:
            self._write_group(self._group)

    def _write_group(self, n: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        group, rest = table.slice(0, n), table.slice(n)
        # One chunk per column, as in a whole table's slice: page boundaries follow the chunks.
        self._writer.write_table(group.combine_chunks(), row_group_size=n)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        self.rows += n

    def close(self) -> int:
        if self._pending_rows or not self.rows:
            # The rest; or an empty table, which `write_table` writes as one row group of 0 rows.
            n = self._pending_rows
            table = pa.Table.from_batches(self._pending, schema=self.schema).combine_chunks()
            self._writer.write_table(table, row_group_size=max(n, 1))
            self._pending, self._pending_rows = [], 0
            self.rows += n
        self._writer.close()
        self._sink.close()
        return self.rows


def write_stream(out: ObjectStore, export: ExportStream, parquet_key: str,
                 jsonl_key: str | None = None) -> tuple[dict[str, StreamedFile], dict[str, Any], list[str]]:
    """Drain ``export`` into ``parquet_key`` (and its lines into ``jsonl_key``); the files' records, the stats
    and the warnings. The files appear only if the whole export succeeds: an exception (including
    ``stream.Unsorted``, which restarts the export) leaves the keys as they were."""
    with ExitStack() as stack:
        pw = stack.enter_context(out.open_write(parquet_key))
        jw = stack.enter_context(out.open_write(jsonl_key)) if jsonl_key else None
        parquet = ParquetStream(pw, export.schema)
        lines = 0

        def on_batch(b: ExportBatch) -> None:
            nonlocal lines
            parquet.add(b.rows)
            if jw is not None and b.lines is not None:
                for chunk in (b.lines.chunks if isinstance(b.lines, pa.ChunkedArray) else [b.lines]):
                    jw.write(_string_data(chunk))
                lines += len(b.lines)

        stats, warned = export.drain(on_batch)
        rows = parquet.close()
    files = {parquet_key: StreamedFile(pw.sha256, pw.size, rows)}
    if jw is not None and jsonl_key is not None:
        files[jsonl_key] = StreamedFile(jw.sha256, jw.size, lines)
    return files, stats, warned


def _string_data(chunk: pa.Array) -> memoryview:
    """The bytes of a string array's values, in order (its data buffer between the first and last offsets)."""
    import numpy as np

    chunk = chunk.cast(pa.string())
    if not len(chunk):
        return memoryview(b"")
    offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
    return memoryview(chunk.buffers()[2])[offsets[0]: offsets[-1]]
