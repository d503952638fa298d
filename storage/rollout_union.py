"""The union of many rollout segments' rows, built on disk: an external merge for compaction
(`flows.shared_cache.compact`), so that folding every rollout a team made into one segment holds one batch
of rows in memory, never the union.

The rows go into a scratch SQLite file (one row per cache key) and come back out in key order, which is the
order `storage.rollout_segments.segment_key` digests and `write_segment` writes. SQLite's B-tree does the
sorting and deduplication on disk, with a page cache of fixed size.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterator

Row = tuple[str, str]  # (cache key, completions as JSON)

# SQLite's page cache (KiB): fixed, whatever the union's size. Larger than SQLite's 2 MB default because
# keys are random, so inserts touch pages all over the B-tree.
_CACHE_KIB = 16 << 10
_FETCH_ROWS = 256  # rows per fetch from SQLite: a fetch is held on top of a row group being built


class RowUnion:
    """Rows added segment by segment (`segment()` makes each one all-or-nothing), read back sorted by key.
    Where segments disagree on a key's payload the least one is kept, so the union is the same whoever
    builds it and in whatever order the segments come."""

    def __init__(self, path: str | Path) -> None:
        # A scratch file: no durability wanted, but a rollback journal on disk, so a damaged segment found
        # part-way can be undone without holding its rows (an in-memory journal would).
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self._db.execute("CREATE TABLE rollouts (key TEXT PRIMARY KEY, completions TEXT NOT NULL)")

    @contextlib.contextmanager
    def segment(self) -> Iterator[None]:
        """One segment's rows, added whole or (on an exception, which is raised) not at all."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, rows: list[Row]) -> None:
        # SQLite compares TEXT bytewise (UTF-8), which orders strings as Python does (by code point).
        self._db.executemany(
            "INSERT INTO rollouts VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET completions = excluded.completions "
            "WHERE excluded.completions < rollouts.completions", rows)

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM rollouts").fetchone()[0]

    def rows(self) -> Iterator[Row]:
        """Every row, sorted by key, fetched a batch at a time."""
        cursor = self._db.execute("SELECT key, completions FROM rollouts ORDER BY key")
        while batch := cursor.fetchmany(_FETCH_ROWS):
            yield from batch

    def close(self) -> None:
        self._db.close()
