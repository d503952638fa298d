"""`lean.kind=kimina`: a client for the Kimina Lean Server (`POST /api/check`).

Request `{"snippets": [{"id", "code"}], "timeout", "debug", "reuse", "infotree"}`, answer
`{"results": [{"id", "time", "response"} | {"id", "time", "error"}]}`. The server splits each snippet into
an import header (reused by its REPLs) and a body; current servers shift message lines by the header so
they count from the snippet's first line, older ones count from the body (`positions`). Outcomes are
re-based so that lines count from the `LeanItem`'s body, like every Lean backend's.

The server answers 429 "No available REPLs" when its REPLs are busy, 500 when one crashed, and 499 when
it thinks the client left; those, 502-504, timeouts and dropped connections are retried with exponential
backoff and full jitter (tenacity). After `breaker_threshold` consecutive failed requests the circuit
opens for `breaker_cooldown_s`: proofs then get `error` verdicts at once instead of queueing on a dead
server. A 401/403 is not retried: the verdicts say which environment variable holds the key (never the
key). Kimina has no tactic mode; per-step checking needs the REPL backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from typing import Any, Literal, Sequence

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from verifiers.base import Verdict
from verifiers.lean.base import LeanItem
from verifiers.lean.verdict import LeanOutcome, error_outcome, lean_verdict, parse_command_response, timeout_outcome

log = logging.getLogger(__name__)
NAME = "lean-kimina"
_RETRY_STATUSES = {429, 499, 500, 502, 503, 504}


class KiminaConfig(BaseModel):
    """The Kimina Lean Server client."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["kimina"] = "kimina"
    base_url: str = Field("http://127.0.0.1:8000", description="Server URL (no credentials in it).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key, sent as "
                                    "`Authorization: Bearer`; None: no key.")
    timeout_s: float = Field(60.0, gt=0, description="Lean time limit per snippet, sent as `timeout`.")
    request_timeout_s: float | None = Field(None, gt=0, description="HTTP limit per request; None: "
                                            "timeout_s x batch_size + 30 (the server runs a batch's snippets "
                                            "in parallel only as far as it has free REPLs).")
    batch_size: int = Field(8, ge=1, le=1024, description="Snippets per request.")
    max_concurrency: int = Field(4, ge=1, description="Requests in flight from one verify call.")
    reuse: bool = Field(True, description="Let the server reuse a REPL that already ran the header.")
    infotree: Literal["full", "tactics", "original", "substantive"] | None = Field(
        None, description="Ask for infotrees (large answers); None: none.")
    positions: Literal["snippet", "body"] = Field(
        "snippet", description="How the server counts message lines: `snippet` (current Kimina: from the "
        "snippet's first line) or `body` (older servers: from the first line after the import header).")
    max_retries: int = Field(4, ge=0, description="Retries of a request after 429/499/5xx/timeouts.")
    backoff_initial_s: float = Field(0.5, gt=0, description="First backoff; doubles per retry, full jitter.")
    backoff_max_s: float = Field(20.0, gt=0, description="Cap on one backoff.")
    breaker_threshold: int = Field(5, ge=1, description="Consecutive failed requests that open the circuit.")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="How long an open circuit refuses requests.")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        u = httpx.URL(v)
        if u.userinfo:
            raise ValueError("`base_url` must not carry credentials; put the key in the variable named by "
                             "`api_key_env`")
        return v.rstrip("/")


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


def kimina_header_lines(code: str) -> int:
    """Lines of Kimina's import header (leading `import` and blank lines) in `code`."""
    n = 0
    for line in code.splitlines():
        if line.strip() and not line.strip().startswith("import "):
            break
        n += 1
    return n


class KiminaVerifier:
    """`Verifier` over a Kimina Lean Server; one verdict per `LeanItem`, by the rules in `verdict.py`."""

    name = NAME

    def __init__(self, config: KiminaConfig | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config or KiminaConfig()
        self.version = "kimina-api-1"
        self._transport = transport
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self.stats = {"requests": 0, "retries": 0, "breaker_opened": 0}
        # The preflights check this with their own section's name; here the section is not known.
        from verifiers.lean.environment import check_kimina_key

        check_kimina_key(self.config, "lean")

    def _headers(self) -> dict[str, str]:
        if self.config.api_key_env is None:
            return {}
        return {"Authorization": f"Bearer {os.environ.get(self.config.api_key_env, '')}"}

    def _wait(self, state: RetryCallState) -> float:
        c = self.config
        cap = min(c.backoff_max_s, c.backoff_initial_s * 2 ** (state.attempt_number - 1))
        return random.uniform(0, cap)

    def _record(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self.config.breaker_threshold and time.monotonic() >= self._open_until:
                self._open_until = time.monotonic() + self.config.breaker_cooldown_s
                self.stats["breaker_opened"] += 1
                log.warning("Kimina circuit open for %.0f s after %d failed requests to %s",
                            self.config.breaker_cooldown_s, self._failures, self.config.base_url)

    def _circuit_open(self) -> bool:
        with self._lock:
            return time.monotonic() < self._open_until

    async def _post_once(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
        self.stats["requests"] += 1
        try:
            resp = await client.post(f"{self.config.base_url}/api/check", json=payload, headers=self._headers())
        except httpx.TimeoutException as exc:
            self._record(False)
            raise _Retryable(f"HTTP timeout ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            self._record(False)
            raise _Retryable(f"connection failed ({type(exc).__name__})") from None
        if resp.status_code in _RETRY_STATUSES:
            self._record(False)
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code in (401, 403):
            self._record(True)  # the server is up; retrying cannot help
            where = f"the variable {self.config.api_key_env!r}" if self.config.api_key_env else \
                "a variable named by `verifier.lean.api_key_env` (none is set)"
            raise _Fatal(f"Kimina server refused the API key (HTTP {resp.status_code}); put the right key in {where}")
        if resp.status_code != 200:
            self._record(True)
            raise _Fatal(f"Kimina server answered HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            data = resp.json()
        except ValueError:
            self._record(False)
            raise _Retryable("Kimina server answered with invalid JSON") from None
        self._record(True)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise _Fatal("Kimina answer has no `results` list")
        return data

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
        def count(state: RetryCallState) -> None:
            self.stats["retries"] += 1

        async for attempt in AsyncRetrying(retry=retry_if_exception_type(_Retryable), wait=self._wait,
                                           stop=stop_after_attempt(self.config.max_retries + 1), reraise=True,
                                           before_sleep=count):
            with attempt:
                if self._circuit_open():
                    raise _Fatal(f"Kimina circuit open after {self.config.breaker_threshold} failed requests to "
                                 f"{self.config.base_url}; check the server (`GET /health`)")
                return await self._post_once(client, payload)
        raise AssertionError("unreachable")

    def _outcome(self, item: LeanItem, result: Any) -> LeanOutcome:
        if not isinstance(result, dict):
            return error_outcome("Kimina result is not an object")
        t = float(result.get("time") or 0.0)
        if result.get("error") is not None:
            err = str(result["error"])
            if "timed out" in err:
                return timeout_outcome(f"Kimina: {err}", t)
            return error_outcome(f"Kimina: {err[:300]}", t)
        outcome = parse_command_response(result.get("response"), t)
        if outcome.error is not None:
            return outcome
        code = item.code
        if self.config.positions == "snippet":
            shift = -item.header_lines
        else:
            shift = kimina_header_lines(code) - item.header_lines
        return outcome.shifted(shift)

    async def _batch(self, client: httpx.AsyncClient, items: Sequence[LeanItem]) -> list[LeanOutcome]:
        payload: dict[str, Any] = {"snippets": [{"id": str(i), "code": it.code} for i, it in enumerate(items)],
                                   "timeout": self.config.timeout_s, "debug": False, "reuse": self.config.reuse}
        if self.config.infotree:
            payload["infotree"] = self.config.infotree
        try:
            data = await self._post(client, payload)
        except _Retryable as exc:
            return [error_outcome(f"Kimina request failed after {self.config.max_retries} retries: {exc}")
                    for _ in items]
        except _Fatal as exc:
            return [error_outcome(str(exc)) for _ in items]
        by_id = {r.get("id"): r for r in data["results"] if isinstance(r, dict)}
        return [self._outcome(it, by_id[str(i)]) if str(i) in by_id else
                error_outcome(f"Kimina answer has no result for snippet {i}") for i, it in enumerate(items)]

    async def check(self, batch: Sequence[LeanItem]) -> list[LeanOutcome]:
        c = self.config
        chunks = [list(batch[i:i + c.batch_size]) for i in range(0, len(batch), c.batch_size)]
        limit = c.request_timeout_s or c.timeout_s * c.batch_size + 30
        sem = asyncio.Semaphore(c.max_concurrency)
        async with httpx.AsyncClient(timeout=limit, transport=self._transport) as client:
            async def one(chunk: list[LeanItem]) -> list[LeanOutcome]:
                async with sem:
                    return await self._batch(client, chunk)

            parts = await asyncio.gather(*(one(ch) for ch in chunks))
        return [o for part in parts for o in part]

    async def verify(self, batch: Sequence[LeanItem]) -> list[Verdict]:
        return [lean_verdict(o, verifier=self.name, version=self.version) for o in await self.check(batch)]

    async def aclose(self) -> None:
        return None
