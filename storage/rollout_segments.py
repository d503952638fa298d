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
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import StorageError
from storage.objectstore import ObjectStore

PREFIX = "_cache/rollouts/"
_NAME = re.compile(r"seg-[0-9a-f]{32}\.parquet")
_KEY = re.compile(r"[0-9a-f]{64}")  # a rollout cache key: sha256 hex
_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False),
                     pa.field("completions", pa.string(), nullable=False)])

Row = tuple[str, str]  # (cache key, completions as JSON)


class BadSegment(StorageError):
    """A segment's content is not what `write_segment` writes (a store that failed to answer raises its own
    error instead: that one is worth retrying, this one is not)."""


class SegmentGone(StorageError):
    """A listed segment was deleted before it was read: compacted away (`flows.shared_cache.compact`), its
    rows in the segment that replaced it, which a new listing shows."""


def segment_key(rows: Iterable[Row]) -> str:
    """The segment's object key: a digest of its sorted rows, so equal content has one name."""
    h = hashlib.sha256()
    for key, payload in sorted(rows):
        h.update(json.dumps([key, payload]).encode())
        h.update(b"\n")
    return f"{PREFIX}seg-{h.hexdigest()[:32]}.parquet"


def write_segment(store: ObjectStore, rows: list[Row]) -> str | None:
    """Publish ``rows`` as one segment; returns its key (None for no rows). Idempotent: a segment of the
    same rows that is already there is left as it is."""
    if not rows:
        return None
    rows = sorted(rows)
    key = segment_key(rows)
    table = pa.table({"key": [r[0] for r in rows], "completions": [r[1] for r in rows]}, schema=_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.create_exclusive(key, buf.getvalue())
    return key


def list_segments(store: ObjectStore) -> list[str]:
    """Keys of the segments on the root, in name order; other files under the prefix are not segments."""
    return [k for k in store.list(PREFIX) if _NAME.fullmatch(k[len(PREFIX):])]


def read_segment(store: ObjectStore, key: str) -> list[Row]:
    """The rows of one segment. Raises StorageError naming the segment, and the row and field at fault,
    for anything that is not a segment as `write_segment` writes it."""
    try:
        data = store.read_bytes(key)
    except StorageError:
        if not store.exists(key):
            raise SegmentGone(f"rollout segment {key!r} is gone (compacted since it was listed).", field="segment",
                              value=key) from None
        raise
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadSegment(f"rollout segment {key!r} is not a readable Parquet file: {exc}", field="segment",
                           value=key) from None
    missing = [c for c in ("key", "completions") if c not in table.column_names]
    if missing:
        raise BadSegment(f"rollout segment {key!r} has no column {missing[0]!r}.", field=missing[0], value=key)
    rows: list[Row] = []
    for i, (k, payload) in enumerate(zip(table.column("key").to_pylist(), table.column("completions").to_pylist())):
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise BadSegment(f"rollout segment {key!r}, row {i}: field 'key' is not a rollout cache key "
                               f"(64 hex digits).", field="key", value=key)
        if not isinstance(payload, str):
            raise BadSegment(f"rollout segment {key!r}, row {i}: field 'completions' is empty.",
                               field="completions", value=key)
        rows.append((k, payload))
    return rows
