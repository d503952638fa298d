"""A rollout cache a team shares: each machine's SQLite replica (`tasks/search/rollout_cache.py`) synchronised
with content-addressed segments on the store root (`storage/rollout_segments.py`).

A shard pulls when it starts (merging every segment its replica has not seen, so rollouts other machines
made are cache hits) and pushes when it has finished (its replica's new rollouts, as one segment). Sharing is
an optimisation: a store that fails to list, read or write a segment (any error of the store's client:
OSError, botocore's, StorageError) costs cache hits, never the build, and is logged; a segment that failed
to arrive is read by the next shard, rows that failed to go out leave with the next shard's push. A segment
whose content is bad is named once and left out for good.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage.objectstore import ObjectStore
from storage.rollout_segments import BadSegment, list_segments, read_segment, write_segment
from tasks.search.rollout_cache import RolloutCache


@dataclass
class PullReport:
    segments: int = 0  # segments merged now
    rows: int = 0  # rollouts new to this replica
    skipped: int = 0  # segments not merged (logged): damaged ones for good, unreadable ones until the next pull


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run (a script, a test of the logic)
        return logging.getLogger("stepforge.shared_cache")


def pull(store: ObjectStore, cache: RolloutCache) -> PullReport:
    """Merge the root's segments that this replica has not seen yet."""
    report = PullReport()
    with cache.sync_lock:
        try:
            seen = cache.seen_segments()
            new = [k for k in list_segments(store) if k not in seen]
        except Exception as exc:  # noqa: BLE001 - the store's client errors, see the module docstring
            _logger().warning("shared rollout cache not read (this shard computes its own rollouts): %s", exc)
            return report
        for key in new:
            try:
                report.rows += cache.merge(read_segment(store, key))
                report.segments += 1
            except (BadSegment, ValueError) as exc:
                # A damaged segment would fail every shard alike: name it once and leave it out.
                _logger().warning("shared rollout segment %s left out: %s", key, exc)
                report.skipped += 1
            except Exception as exc:  # noqa: BLE001 - the store failed to answer: the next shard retries
                _logger().warning("shared rollout segment %s not read now: %s", key, exc)
                report.skipped += 1
                continue
            cache.note_segments([key])
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
