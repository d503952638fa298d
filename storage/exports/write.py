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

import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable

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

    def discard(self) -> None:
        """Close after a failure, while the output is still open (it is abandoned, not published): otherwise
        pyarrow flushes its buffer when the writer is collected, after the output is gone, and prints why."""
        self._pending, self._pending_rows = [], 0
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # the output already failed; its error is the one raised
            pass


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

        def write(b: ExportBatch) -> None:
            nonlocal lines
            parquet.add(b.rows)
            if jw is not None and b.lines is not None:
                for chunk in (b.lines.chunks if isinstance(b.lines, pa.ChunkedArray) else [b.lines]):
                    jw.write(_string_data(chunk))
                lines += len(b.lines)

        try:
            with _WriterThread(write) as writer:
                stats, warned = export.drain(writer.put)
            rows = parquet.close()
        except BaseException:
            parquet.discard()
            raise
    files = {parquet_key: StreamedFile(pw.sha256, pw.size, rows)}
    if jw is not None and jsonl_key is not None:
        files[jsonl_key] = StreamedFile(jw.sha256, jw.size, lines)
    return files, stats, warned


_END = object()


class _WriterThread:
    """Writes the batches on a thread of its own while the exporter computes the next ones: encoding and
    compressing Parquet and Arrow compute both run in C++ without the GIL, so on two cores an export takes
    about the longer of the two instead of their sum. Batches are written in the order they were put, by one
    thread, so the bytes are the same as writing them inline. At most ``depth`` batches wait, which keeps
    memory bounded; an error on either side stops both and is raised in the caller."""

    def __init__(self, write: Callable[[ExportBatch], None], depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="export-writer", daemon=True)

    def __enter__(self) -> "_WriterThread":
        self._thread.start()
        return self

    def put(self, batch: ExportBatch) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as e:  # raised in the caller; later batches are taken and dropped
                    self._error = e

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # The writer keeps taking batches until it sees the end, so this put never waits on a stopped thread.
        self._queue.put(_END)
        self._thread.join()
        if exc is None and self._error is not None:
            raise self._error


def _string_data(chunk: pa.Array) -> memoryview:
    """The bytes of a string array's values, in order (its data buffer between the first and last offsets)."""
    import numpy as np

    chunk = chunk.cast(pa.string())
    if not len(chunk):
        return memoryview(b"")
    offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
    return memoryview(chunk.buffers()[2])[offsets[0]: offsets[-1]]
