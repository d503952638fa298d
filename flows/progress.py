"""Progress reporting from the flow and its shard tasks to whoever listens in this process (the CLI's
progress bar). Events are ("total", problems) once the source is loaded, then ("advance", problems)."""

from __future__ import annotations

import threading
from typing import Callable, Literal

Event = Literal["total", "advance"]
_lock = threading.Lock()
_listeners: list[Callable[[Event, int], None]] = []


def subscribe(fn: Callable[[Event, int], None]) -> Callable[[], None]:
    with _lock:
        _listeners.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return unsubscribe


def _emit(event: Event, n: int) -> None:
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        fn(event, n)


def set_total(n: int) -> None:
    _emit("total", n)


def advance(n: int = 1) -> None:
    _emit("advance", n)
