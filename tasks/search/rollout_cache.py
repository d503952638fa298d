"""Content-addressed rollout cache: (policy id, prompt hash, sampling params incl. seed) -> completions.

Completions, not verdicts, are cached: generation is the expensive part, and verdicts depend on the
verifier version, so they are recomputed (cheaply) on every hit. Backed by SQLite so the MC estimate of
a prefix computed by one algorithm, run or dataset version is reused by the next. The SQLite file is one
machine's replica; `flows/shared_cache.py` exchanges its rows with other machines through segments on the
store root (`unshared` lists what this replica made and has not published, `segments` what it has merged).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from tasks.policy.base import Completion


# `json.dumps(..., default=list)` builds a new encoder per call (any non-default option does); this one is built once
# and gives the same text. A key is made for every request.
_ENCODE = json.JSONEncoder(default=list).encode


def cache_key(policy_id: str, prompt: str, params_key: tuple, *, prompt_sha256: str | None = None) -> str:
    """`prompt_sha256`: the prompt's sha256 hex digest where the caller has it already (the engine's seeds use it)."""
    digest = prompt_sha256 or hashlib.sha256(prompt.encode()).hexdigest()
    return hashlib.sha256(_ENCODE([policy_id, digest, list(params_key)]).encode()).hexdigest()


class RolloutCache:
    """Thread-safe; `path=None` keeps it in memory (one build), a file shares it across builds.

    Shard tasks of one build run in threads of one process: `RolloutCache.shared(path)` hands them one
    connection (reference-counted), because several SQLite connections racing to set up the same file
    fail with "database is locked". Other processes get their own connection; WAL and a busy timeout
    let them read while one writes.
    """

    _registry: dict[str, tuple["RolloutCache", int]] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(Path(path).resolve()) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._shared = False
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA busy_timeout = 60000")
        if path:
            self._setup_file()
        else:
            self._create_tables()
        self.hits = 0
        self.misses = 0
        # Held while the replica is synchronised with the shared segments (`flows/shared_cache.py`), so
        # shards of one process starting together read each segment once.
        self.sync_lock = threading.Lock()

    def _create_tables(self) -> None:
        for ddl in _DDL:
            self._db.execute(ddl)

    def _setup_file(self) -> None:
        # Switching to WAL takes a lock that the busy handler does not always wait for; another process
        # may be doing the same at this moment, so retry briefly instead of failing the shard.
        delay = 0.05
        for attempt in range(40):
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, no fsync per put
                self._create_tables()
                self._db.commit()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 39:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @classmethod
    def shared(cls, path: str | Path) -> "RolloutCache":
        key = str(Path(path).resolve())
        with cls._registry_lock:
            cache, refs = cls._registry.get(key, (None, 0))
            if cache is None:
                cache = cls(key)
                cache._shared = True
            cls._registry[key] = (cache, refs + 1)
            return cache

    def get(self, key: str) -> list[Completion] | None:
        with self._lock:
            row = self._db.execute("SELECT completions FROM rollouts WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return [_decode(d) for d in json.loads(row[0])]

    def put(self, key: str, completions: list[Completion]) -> None:
        payload = json.dumps([_encode(c) for c in completions])
        with self._lock:
            if self._db.execute("INSERT OR IGNORE INTO rollouts VALUES (?, ?)", (key, payload)).rowcount:
                # Made here, so not yet in any shared segment: published when a shard finishes.
                self._db.execute("INSERT OR IGNORE INTO unshared VALUES (?)", (key,))
            self._db.commit()

    # -- the replica's side of the shared cache (`storage/rollout_segments.py`): raw rows, no decoding --
    def unshared(self) -> list[tuple[str, str]]:
        """(key, completions JSON) of every rollout this replica made and has not yet published."""
        with self._lock:
            return self._db.execute("SELECT r.key, r.completions FROM unshared u JOIN rollouts r ON r.key = u.key "
                                    "ORDER BY r.key").fetchall()

    def mark_shared(self, keys: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM unshared WHERE key = ?", [(k,) for k in keys])
            self._db.commit()

    @staticmethod
    def check_rows(rows: list[tuple[str, str]]) -> None:
        """Raise ValueError naming the first row whose payload is not a list of completions as `put` stores."""
        for key, payload in rows:
            try:
                [_decode(d) for d in json.loads(payload)]
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"rollout {key}: field 'completions' is not a list of completions ({exc})") from None

    def merge(self, rows: list[tuple[str, str]]) -> int:
        """Add rows published by other replicas (a row already here wins); returns how many were new. Each
        payload is decoded first, so a malformed one fails here, naming its key, not in a later shard."""
        self.check_rows(rows)
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO rollouts VALUES (?, ?)", rows)
            self._db.commit()
            return self._db.total_changes - before

    def seen_segments(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM segments")}

    def note_segments(self, names: list[str]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO segments VALUES (?)", [(n,) for n in names])
            self._db.commit()

    def close(self) -> None:
        if self._shared:
            with self._registry_lock:
                _, refs = self._registry[self.path]
                if refs > 1:
                    self._registry[self.path] = (self, refs - 1)
                    return
                del self._registry[self.path]
        with self._lock:
            self._db.close()


_DDL = (
    "CREATE TABLE IF NOT EXISTS rollouts (key TEXT PRIMARY KEY, completions TEXT NOT NULL)",
    # Keys of rollouts made by this replica and not yet in a shared segment (rows merged from segments are
    # never listed: they are published already). A replica from before the shared cache starts empty here.
    "CREATE TABLE IF NOT EXISTS unshared (key TEXT PRIMARY KEY)",
    # Shared segments already merged into this replica, so each is read once.
    "CREATE TABLE IF NOT EXISTS segments (name TEXT PRIMARY KEY)",
)


def _encode(c: Completion) -> dict:
    return {"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "mean_logprob": c.mean_logprob,
            "token_logprobs": list(c.token_logprobs) if c.token_logprobs is not None else None,
            "cached_tokens": c.cached_tokens, "stop_reason": c.stop_reason}


def _decode(d: dict) -> Completion:
    lps = d.get("token_logprobs")
    return Completion(text=d["text"], finish_reason=d["finish_reason"], prompt_tokens=d["prompt_tokens"],
                      completion_tokens=d["completion_tokens"], mean_logprob=d.get("mean_logprob"),
                      token_logprobs=tuple(lps) if lps is not None else None,
                      cached_tokens=d.get("cached_tokens"), stop_reason=d.get("stop_reason"))
