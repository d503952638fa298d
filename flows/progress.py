"""Progress reporting from shard tasks to whoever listens (the CLI's progress bar) in this process."""

from __future__ import annotations

import threading
from typing import Callable

_lock = threading.Lock()
_listeners: list[Callable[[int], None]] = []


def subscribe(fn: Callable[[int], None]) -> Callable[[], None]:
    with _lock:
        _listeners.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return unsubscribe


def advance(n: int = 1) -> None:
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        fn(n)
