"""The cyclic garbage collector while shards run: everything older than the first running shard is set aside.

A shard's event loop is latency-bound (the backend's slots idle while the loop is busy), and CPython's full
collections scan every container object in the process: in a worker that is Prefect's state, the imported
modules and an earlier shard's leftovers, hundreds of thousands of objects for a few milliseconds each time,
during the search, where it delays requests. `gc.freeze` moves the objects that exist when the first shard
starts out of the collector's reach (O(1)); the shard's own objects are collected as usual; when the last
running shard ends, `gc.unfreeze` hands the old ones back, so nothing is kept for good (garbage among them is
collected later instead of during the shards). A process that froze objects itself (a fork server) is left
alone: our unfreeze would undo its freeze.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_running = 0  # shards inside `old_objects_set_aside`, in every thread
_froze = False  # whether the first of them froze (nobody else had)


@contextmanager
def old_objects_set_aside() -> Iterator[None]:
    global _running, _froze
    with _lock:
        if _running == 0:
            # O(1) when nothing is frozen (the usual case); a process that froze objects itself pays one walk of
            # them here per first shard (CPython 3.11 counts the permanent generation by walking it).
            _froze = gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0 and _froze:
                gc.unfreeze()
                _froze = False
