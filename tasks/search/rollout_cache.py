"""Content-addressed rollout cache: (policy id, prompt hash, sampling params incl. seed) -> completions.

Completions, not verdicts, are cached: generation is the expensive part, and verdicts depend on the
verifier version, so they are recomputed (cheaply) on every hit. Backed by SQLite so the MC estimate of
a prefix computed by one algorithm, run or dataset version is reused by the next.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from tasks.policy.base import Completion


def cache_key(policy_id: str, prompt: str, params_key: tuple) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([policy_id, hashlib.sha256(prompt.encode()).hexdigest(), list(params_key)],
                        default=list).encode())
    return h.hexdigest()


class RolloutCache:
    """Thread-safe; `path=None` keeps it in memory (one build), a file shares it across builds."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS rollouts (key TEXT PRIMARY KEY, completions TEXT NOT NULL)")
        self.hits = 0
        self.misses = 0

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
            self._db.execute("INSERT OR IGNORE INTO rollouts VALUES (?, ?)", (key, payload))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
