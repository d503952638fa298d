"""Leases on a build's staging folder, so builds of one config that run at once can share it.

Two builds with the same ``build_key`` (a scheduled and an on-demand run of one deployment) share
``<dataset>/_staging/<build_key>/``: whichever stages a shard first serves it to the other. Each build
holds a lease while it uses the folder, and the folder is removed only when no live lease remains::

    <dataset>/_leases/<build_key>/<holder>.json   one per running build, rewritten as a heartbeat
    <dataset>/_leases/<build_key>/_closing        taken (conditional create) by whoever removes staging

Only conditional creates, plain writes, listings and deletes are used, so the protocol is the same on a
local folder and on S3. It closes the race between "the last holder finds no lease and removes the
folder" and "a new build arrives" like this: a new build writes its lease first and then waits while
``_closing`` exists; the remover takes ``_closing`` first and then lists leases. Either the remover's
listing sees the newcomer's lease (and keeps the folder), or the newcomer sees ``_closing`` and starts
only after the removal, with an empty folder (its shards are then recomputed, the rollout cache
answering for them).

A lease is live while its heartbeat is younger than its ``ttl_s`` and, when it was taken on this host,
while its process still runs; a SIGKILLed build's lease is therefore dead at once for the next build on
the same machine, and after ``ttl_s`` for everyone else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from storage.errors import StorageError
from storage.objectstore import ObjectInfo, ObjectStore, validate_name

__all__ = ["StagingLease", "LeaseInfo", "hold_staging", "leases", "remove_staging_if_unheld", "release_staging",
           "closing_abandoned"]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 600.0  # a lease not renewed for this long is dead (its build was killed or lost the store)
CLOSING = "_closing"
CLOSING_TIMEOUT_S = 300.0  # a `_closing` marker older than this belongs to a remover that died midway
_WAIT_POLL_S = 0.2


def _lease_dir(dataset: str, build_key: str) -> str:
    validate_name(dataset)
    validate_name(build_key, field="build_key")
    return f"{dataset}/_leases/{build_key}"


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), so a reused pid is not mistaken for the
    holder; ``None`` where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _same_host_process_gone(body: dict[str, Any]) -> bool:
    """True when ``body`` (a lease or `_closing` marker) was written on this host by a process that is gone."""
    pid = body.get("pid")
    if body.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if not _pid_alive(pid):
        return True
    start = body.get("pid_start")
    return start is not None and _process_start(pid) not in (None, start)  # the pid was reused


def _owner_body() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid)}


def closing_abandoned(store: ObjectStore, key: str) -> bool:
    """The `_closing` marker at ``key`` exists and its remover died (this host) or timed out (anywhere)."""
    found = [i for i in store.list_info(key) if i.key == key]
    if not found:
        return False
    if _age(found[0], time.time()) >= CLOSING_TIMEOUT_S:
        return True
    try:
        body = json.loads(store.read_bytes(key))
    except (StorageError, ValueError):
        return False  # removed meanwhile, or half-visible: not abandoned
    return isinstance(body, dict) and _same_host_process_gone(body)


@dataclass(frozen=True)
class LeaseInfo:
    key: str
    holder: str
    body: dict[str, Any]
    age_s: float

    @property
    def live(self) -> bool:
        ttl = self.body.get("ttl_s")
        if not isinstance(ttl, (int, float)) or self.age_s >= ttl:
            return False
        return not _same_host_process_gone(self.body)


def _age(info: ObjectInfo, now: float) -> float:
    return max(0.0, now - info.mtime)


def leases(store: ObjectStore, dataset: str, build_key: str) -> list[LeaseInfo]:
    """Every lease on ``dataset``'s staging of ``build_key``, live or dead (see ``LeaseInfo.live``)."""
    now = time.time()
    out = []
    for info in store.list_info(f"{_lease_dir(dataset, build_key)}/"):
        name = info.key.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        try:
            body = json.loads(store.read_bytes(info.key))
        except (StorageError, ValueError):  # released meanwhile, or unreadable: treated as dead
            body = {}
        out.append(LeaseInfo(info.key, name.removesuffix(".json"), body if isinstance(body, dict) else {}, _age(info, now)))
    return out


class StagingLease:
    """One build's hold on ``<dataset>/_staging/<build_key>/``; renewed by a daemon thread until closed.

    Use ``hold_staging`` (a context manager); the commit releases it with ``release_staging``, which also
    removes the folder when this was the last live lease.
    """

    def __init__(self, store: ObjectStore, dataset: str, build_key: str, *, ttl_s: float = DEFAULT_TTL_S,
                 holder: str | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store, self.dataset, self.build_key, self.ttl_s = store, dataset, build_key, ttl_s
        self.holder = holder or uuid.uuid4().hex
        validate_name(self.holder, field="holder")
        self.key = f"{_lease_dir(dataset, build_key)}/{self.holder}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body = json.dumps({"holder": self.holder, **_owner_body(), "ttl_s": ttl_s,
                                 "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                sort_keys=True).encode()

    def acquire(self, *, wait_s: float = CLOSING_TIMEOUT_S) -> "StagingLease":
        """Write the lease, then wait while a removal of the folder is under way (see the module doc)."""
        self.store.write_bytes(self.key, self._body)
        closing = f"{_lease_dir(self.dataset, self.build_key)}/{CLOSING}"
        deadline = time.monotonic() + wait_s
        while self.store.exists(closing):
            if closing_abandoned(self.store, closing) or time.monotonic() > deadline:
                # Its remover died midway (or is stuck): what it left is removed by the next release or gc;
                # this build recomputes whatever it finds missing.
                self.store.delete(closing)
                break
            time.sleep(_WAIT_POLL_S)
        self._thread = threading.Thread(target=self._beat, name=f"stepforge-lease-{self.holder[:8]}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.store.write_bytes(self.key, self._body)
            except Exception as exc:  # the store is away: keep trying; the lease lapses after ttl_s
                if not failing:
                    log.warning("staging lease %s not renewed (%s); retrying", self.key, exc)
                failing = True
            else:
                if failing:
                    log.warning("staging lease %s renewed again", self.key)
                failing = False

    def close(self) -> None:
        """Stop renewing and drop the lease; the staging folder stays (a failed build resumes from it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.store.delete(self.key)
        except Exception as exc:  # the lease lapses on its own after ttl_s
            log.warning("staging lease %s not removed (%s); it lapses after %.0f s", self.key, exc, self.ttl_s)

    def __enter__(self) -> "StagingLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hold_staging(store: ObjectStore, dataset: str, build_key: str, *, ttl_s: float = DEFAULT_TTL_S) -> StagingLease:
    """Take a lease on the staging of ``build_key`` (``with hold_staging(...) as lease:``)."""
    return StagingLease(store, dataset, build_key, ttl_s=ttl_s).acquire()


def remove_staging_if_unheld(store: ObjectStore, dataset: str, build_key: str) -> bool:
    """Remove ``<dataset>/_staging/<build_key>/`` if no live lease holds it; True when removed.

    Dead leases (killed builds) are removed with it. When another remover is at work, this one leaves it
    to them.
    """
    ldir = _lease_dir(dataset, build_key)
    closing = f"{ldir}/{CLOSING}"
    body = json.dumps(_owner_body()).encode()
    if not store.create_exclusive(closing, body):
        if not closing_abandoned(store, closing):
            return False
        store.delete(closing)  # its remover died midway; take over
        if not store.create_exclusive(closing, body):
            return False
    try:
        held = leases(store, dataset, build_key)
        if any(lease.live for lease in held):
            return False
        store.delete_prefix(f"{dataset}/_staging/{build_key}/")
        for lease in held:
            store.delete(lease.key)
        return True
    finally:
        store.delete(closing)


def release_staging(store: ObjectStore, dataset: str, build_key: str, holder: str | None) -> bool:
    """After a commit: drop ``holder``'s lease (if any) and remove the staging when nobody else holds it."""
    if holder is not None:
        validate_name(holder, field="holder")
        store.delete(f"{_lease_dir(dataset, build_key)}/{holder}.json")
    return remove_staging_if_unheld(store, dataset, build_key)
