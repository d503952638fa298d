"""A rollout cache a team shares: each machine's SQLite replica (`tasks/search/rollout_cache.py`) synchronised
with content-addressed segments on the store root (`storage/rollout_segments.py`).

A shard pulls when it starts (merging every segment its replica has not seen, so rollouts other machines
made are cache hits) and pushes when it has finished (its replica's new rollouts, as one segment). Sharing is
an optimisation: a store that fails to list, read or write a segment (any error of the store's client:
OSError, botocore's, StorageError) costs cache hits, never the build, and is logged; a segment that failed
to arrive is read by the next shard, rows that failed to go out leave with the next shard's push. A segment
whose content is bad is named once and left out for good.

Compaction (`compact`, `stepforge datasets compact-cache`) folds the segments into one: it writes the union
as a new content-addressed segment, reads it back, and only then deletes the segments it replaces, so every
row is in some segment at every moment. A shard that listed a segment compaction has since deleted lists
again and reads the replacement.

A compacted segment holds every rollout the team made, so neither side holds a segment whole: `pull` merges
one batch (a row group) at a time, and `compact` builds the union in a scratch SQLite file
(`storage/rollout_union.py`) and streams it out in key order; memory is a batch, disk the union.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import StorageError
from storage.objectstore import ObjectStore
from storage.rollout_segments import (BadSegment, SegmentDigest, SegmentGone, iter_segment, list_segments,
                                      write_segment)
from storage.rollout_union import RowUnion
from tasks.search.rollout_cache import RolloutCache


@dataclass
class PullReport:
    segments: int = 0  # segments merged now
    rows: int = 0  # rollouts new to this replica
    skipped: int = 0  # segments not merged (logged): damaged ones for good, unreadable ones until the next pull
    gone: int = 0  # listed segments compacted away before they were read (their rows came from the new one)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run (a script, a test of the logic)
        return logging.getLogger("stepforge.shared_cache")


def pull(store: ObjectStore, cache: RolloutCache) -> PullReport:
    """Merge the root's segments that this replica has not seen yet."""
    report = PullReport()
    tried: set[str] = set()
    with cache.sync_lock:
        # A second listing only when a listed segment was compacted away meanwhile: its rows are in the segment
        # that replaced it, written before it was deleted, so the second listing shows that one. (One more
        # compaction between the two listings costs this shard those hits, never the build.)
        for _listing in range(2):
            try:
                seen = cache.seen_segments()
                new = [k for k in list_segments(store) if k not in seen and k not in tried]
            except Exception as exc:  # noqa: BLE001 - the store's client errors, see the module docstring
                _logger().warning("shared rollout cache not read (this shard computes its own rollouts): %s", exc)
                return report
            gone = 0
            for key in new:
                tried.add(key)
                try:
                    # A batch at a time: a damaged row found late leaves the batches before it merged (each
                    # row checked, so harmless) and the segment unnoted, as a damaged segment always is.
                    for batch in iter_segment(store, key):
                        report.rows += cache.merge(batch)
                    report.segments += 1
                except SegmentGone:
                    gone += 1
                    continue
                except (BadSegment, ValueError) as exc:
                    # A damaged segment would fail every shard alike: name it once and leave it out.
                    _logger().warning("shared rollout segment %s left out: %s", key, exc)
                    report.skipped += 1
                except Exception as exc:  # noqa: BLE001 - the store failed to answer: the next shard retries
                    _logger().warning("shared rollout segment %s not read now: %s", key, exc)
                    report.skipped += 1
                    continue
                cache.note_segments([key])
            report.gone += gone
            if not gone:
                break
    return report


def push(store: ObjectStore, cache: RolloutCache) -> str | None:
    """Publish this replica's unshared rollouts as one segment; returns its key (None: nothing new, or the
    store failed, which is logged)."""
    rows = cache.unshared()
    if not rows:
        return None
    try:
        key = write_segment(store, rows)
    except Exception as exc:  # noqa: BLE001 - the store's client errors, see the module docstring
        _logger().warning("shared rollout cache not written (kept locally, sent with the next shard): %s", exc)
        return None
    cache.mark_shared([k for k, _ in rows])
    if key is not None:
        cache.note_segments([key])  # its rows are here already
    return key


@dataclass
class CompactReport:
    key: str | None = None  # the one segment the merged ones became (None: fewer than two to merge)
    read: int = 0  # segments whose rows `key` holds (it may be one of them, kept)
    merged: list[str] = field(default_factory=list)  # segments folded into `key` and deleted
    rows: int = 0  # rollouts in `key`
    left: dict[str, str] = field(default_factory=dict)  # damaged segments left in place -> why
    gone: int = 0  # listed segments another compaction deleted meanwhile (their rows are in its segment)


def compact(store: ObjectStore) -> CompactReport:
    """Merge the root's rollout segments into one content-addressed segment and delete the merged ones, only
    after the new one is written and read back whole. Damaged segments (that `pull` leaves out) stay where
    they are and are reported, so one bad row never makes the merged segment unreadable. A store that fails
    raises before anything is deleted; rerun it. Safe beside running shards (they list again when a segment
    they listed is gone), segments pushed meanwhile (never listed, so never deleted) and another compaction
    (each deletes only segments whose rows its own written segment holds). Memory is a batch of rows; the
    union is built in a scratch SQLite file under the temp folder (about the rows' size, uncompressed)."""
    with tempfile.TemporaryDirectory(prefix="stepforge-compact-") as scratch:
        union = RowUnion(Path(scratch) / "union.sqlite")
        try:
            return _compact(store, union)
        finally:
            union.close()


def _compact(store: ObjectStore, union: RowUnion) -> CompactReport:
    report = CompactReport()
    readable: list[str] = []
    for key in list_segments(store):
        try:
            # A segment is checked whole before it counts: one found damaged part-way is taken out again.
            with union.segment():
                for batch in iter_segment(store, key):
                    RolloutCache.check_rows(batch)
                    union.add(batch)
        except SegmentGone:
            report.gone += 1
            continue
        except (BadSegment, ValueError) as exc:
            report.left[key] = str(exc)
            continue
        readable.append(key)
    report.read, report.rows = len(readable), union.count()
    if len(readable) < 2:
        report.key = readable[0] if readable else None
        return report
    key = write_segment(store, union.rows())
    # Read back before deleting anything: a key another writer had claimed but not filled (a store without
    # hard links) must not stand in for the rows about to be deleted. The digest of the rows as they read
    # back, in file order, names the segment only if they are the union's rows in the union's order.
    if key is None or not _reads_back_as(store, key):
        raise StorageError(f"compacted rollout segment {key!r} does not read back as written; nothing deleted.",
                           field="segment", value=key)
    for old in readable:
        if old != key:
            store.delete(old)
            report.merged.append(old)
    report.key = key
    return report


def _reads_back_as(store: ObjectStore, key: str) -> bool:
    digest = SegmentDigest()
    try:
        for batch in iter_segment(store, key):
            digest.update(batch)
    except SegmentGone:
        return False
    return digest.key() == key
