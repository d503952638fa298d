"""The shared half of the rollout cache: content-addressed Parquet segments on the store root.

Each shard's new rollouts are written, when the shard finishes, as one immutable segment
``<root>/_cache/rollouts/seg-<sha256 of its rows>.parquet`` (columns ``key``, ``completions``: the rollout
cache key and its completions as JSON, exactly as the local SQLite replica holds them), and every shard,
when it starts, merges the segments its replica has not seen yet. Immutable objects under content names
need nothing from the store but put-if-absent, list and get: no locks, no appends, no database server,
and the same code on a local folder and on S3. Two writers of the same rows write the same name (the second
create is a no-op); a reader never sees a half-written segment (local: temp file and link; S3: a PUT is
atomic). Compaction (`flows.shared_cache.compact`) writes the union of many segments as one and only then
deletes them, so a reader that finds a listed segment gone (`SegmentGone`) lists again to find its rows.

A compacted segment holds every rollout a team made, so nothing here holds a segment whole: segments are
written in row groups of at most `ROW_GROUP_ROWS` rows (fewer when the payloads are long), spooled to a temp
file and published from it, and read back a row group at a time (`iter_segment`) from the file where it
stands (local) or from a temp copy (S3). Memory is one row group, whatever the segment's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.errors import StorageError
from storage.objectstore import ObjectStore

PREFIX = "_cache/rollouts/"
_NAME = re.compile(r"seg-[0-9a-f]{32}\.parquet")
_KEY = re.compile(r"[0-9a-f]{64}")  # a rollout cache key: sha256 hex
_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False),
                     pa.field("completions", pa.string(), nullable=False)])
_COLUMNS = ["key", "completions"]

# A row group is the unit a reader holds: at most this many rows, and a group is closed early once its
# strings pass ROW_GROUP_BYTES (completions with token logprobs run to tens of KB a row). Both depend only
# on the rows, so a segment's bytes still depend only on its rows; its name never depended on its bytes.
ROW_GROUP_ROWS = 4096
ROW_GROUP_BYTES = 4 << 20
# Reads of a segment's copy from a remote store: one GET per piece, and the piece is what is held.
_COPY_PIECE = 8 << 20

Row = tuple[str, str]  # (cache key, completions as JSON)


class BadSegment(StorageError):
    """A segment's content is not what `write_segment` writes (a store that failed to answer raises its own
    error instead: that one is worth retrying, this one is not)."""


class SegmentGone(StorageError):
    """A listed segment was deleted before it was read: compacted away (`flows.shared_cache.compact`), its
    rows in the segment that replaced it, which a new listing shows."""


class SegmentDigest:
    """`segment_key`'s digest fed a batch at a time, for rows that arrive in sorted order (a compaction's
    union, a segment read back): the same bytes hashed in the same order as `segment_key` hashes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.add(row)

    def add(self, row: Row) -> None:
        self._hash.update(json.dumps([row[0], row[1]]).encode())
        self._hash.update(b"\n")

    def key(self) -> str:
        return f"{PREFIX}seg-{self._hash.hexdigest()[:32]}.parquet"


def segment_key(rows: Iterable[Row]) -> str:
    """The segment's object key: a digest of its sorted rows, so equal content has one name."""
    digest = SegmentDigest()
    digest.update(sorted(rows))
    return digest.key()


def _in_order(rows: Iterable[Row]) -> Iterator[Row]:
    previous: Row | None = None
    for row in rows:
        if previous is not None and row < previous:
            raise ValueError(f"rows for a rollout segment must come sorted: {row[0]!r} after {previous[0]!r}.")
        previous = row
        yield row


def _row_groups(rows: Iterator[Row], digest: SegmentDigest) -> Iterator[pa.Table]:
    """``rows`` cut into row groups (see ROW_GROUP_ROWS), each row fed to ``digest`` on the way."""
    keys: list[str] = []
    payloads: list[str] = []
    size = 0
    for row in rows:
        digest.add(row)
        key, payload = row
        keys.append(key)
        payloads.append(payload)
        size += len(key) + len(payload)
        if len(keys) == ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
            yield pa.table({"key": keys, "completions": payloads}, schema=_SCHEMA)
            keys, payloads, size = [], [], 0
    if keys:
        yield pa.table({"key": keys, "completions": payloads}, schema=_SCHEMA)


def write_segment(store: ObjectStore, rows: list[Row] | Iterable[Row]) -> str | None:
    """Publish ``rows`` as one segment; returns its key (None for no rows). Idempotent: a segment of the
    same rows that is already there is left as it is. A list is sorted here; any other iterable must yield
    its rows sorted (compaction's union does; checked as they stream) and is never held whole: the file
    is written to a temp file, named by the digest computed on the way, and published from there."""
    ordered = iter(sorted(rows)) if isinstance(rows, list) else _in_order(rows)
    digest = SegmentDigest()
    with tempfile.TemporaryDirectory(prefix="stepforge-segment-") as scratch:
        path = f"{scratch}/segment.parquet"
        written = 0
        with pq.ParquetWriter(path, _SCHEMA, compression="zstd", use_dictionary=False) as writer:
            for group in _row_groups(ordered, digest):
                writer.write_table(group, row_group_size=group.num_rows)
                written += group.num_rows
        if not written:
            return None
        key = digest.key()
        with open(path, "rb") as f:
            store.create_exclusive(key, f)
    return key


def list_segments(store: ObjectStore) -> list[str]:
    """Keys of the segments on the root, in name order; other files under the prefix are not segments."""
    return [k for k in store.list(PREFIX) if _NAME.fullmatch(k[len(PREFIX):])]


@contextlib.contextmanager
def _opened(store: ObjectStore, key: str) -> Iterator[pa.NativeFile]:
    """The segment as a local file to parse. Only the store is read in here, so an error here is the
    store's (SegmentGone if the key is gone) and any error parsing the file is the segment's."""
    with contextlib.ExitStack() as stack:
        try:
            source = _open(store, key, stack)
        except (OSError, StorageError):
            if not store.exists(key):
                raise SegmentGone(f"rollout segment {key!r} is gone (compacted since it was listed).",
                                  field="segment", value=key) from None
            raise
        yield source


def _open(store: ObjectStore, key: str, stack: contextlib.ExitStack) -> pa.NativeFile:
    fs, path = store.filesystem_path(key)
    if isinstance(fs, pafs.LocalFileSystem):
        # Read where it stands: the open file outlives a compaction deleting the segment meanwhile.
        return stack.enter_context(fs.open_input_file(path))
    # A remote segment is copied whole to a temp file first, in large sequential pieces (one GET each),
    # rather than parsed over the network (a ranged GET per column chunk, and a network error would then
    # look like a damaged file, which `pull` leaves out for good).
    copy = f"{stack.enter_context(tempfile.TemporaryDirectory(prefix='stepforge-segment-'))}/copy.parquet"
    with fs.open_input_stream(path) as src, open(copy, "wb") as out:
        while piece := src.read(_COPY_PIECE):
            out.write(piece)
    return stack.enter_context(pa.OSFile(copy))


def iter_segment(store: ObjectStore, key: str) -> Iterator[list[Row]]:
    """The rows of one segment, a batch (about a row group) at a time. Raises SegmentGone if it was
    deleted since it was listed, BadSegment naming the segment, and the row and field at fault, for anything
    that is not a segment as `write_segment` writes it (possibly after earlier batches were yielded), and the
    store's own errors as they are."""
    with _opened(store, key) as source:
        try:
            parquet = pq.ParquetFile(source)
            names = parquet.schema_arrow.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise _unreadable(key, exc) from None
        missing = [c for c in _COLUMNS if c not in names]
        if missing:
            raise BadSegment(f"rollout segment {key!r} has no column {missing[0]!r}.", field=missing[0], value=key)
        batches = _batches(parquet)
        start = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowInvalid, OSError) as exc:
                raise _unreadable(key, exc) from None
            if batch is None:
                return
            rows = _checked(key, batch, start)
            start += len(rows)
            yield rows


def _batches(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    # One row group at a time: pyarrow's reader over all of a file's row groups keeps buffers of those it
    # has read until it ends (measured with pyarrow 26: 38 -> 109 MB allocated over a 172-group segment,
    # against a steady 5 MB group by group).
    rows = _batch_rows(parquet.metadata)
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(batch_size=rows, row_groups=[group], columns=_COLUMNS)


def _batch_rows(metadata: pq.FileMetaData) -> int:
    """Rows per batch read, so that a batch's strings come to about ROW_GROUP_BYTES: Arrow's reader holds
    a few times a batch, and a segment written before row groups were bounded is one group of any size."""
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if metadata.num_rows <= 0 or size <= 0:
        return ROW_GROUP_ROWS
    return max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES * metadata.num_rows // size))


def read_segment(store: ObjectStore, key: str) -> list[Row]:
    """The rows of one segment, whole (small segments and tests; `iter_segment` streams)."""
    return [row for batch in iter_segment(store, key) for row in batch]


def _unreadable(key: str, exc: Exception) -> BadSegment:
    return BadSegment(f"rollout segment {key!r} is not a readable Parquet file: {exc}", field="segment", value=key)


def _checked(key: str, batch: pa.RecordBatch, start: int) -> list[Row]:
    rows: list[Row] = []
    for i, (k, payload) in enumerate(zip(batch.column("key").to_pylist(), batch.column("completions").to_pylist()), start):
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise BadSegment(f"rollout segment {key!r}, row {i}: field 'key' is not a rollout cache key "
                             f"(64 hex digits).", field="key", value=key)
        if not isinstance(payload, str):
            raise BadSegment(f"rollout segment {key!r}, row {i}: field 'completions' is empty.",
                             field="completions", value=key)
        rows.append((k, payload))
    return rows
