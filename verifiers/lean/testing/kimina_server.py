"""A stand-in for the Kimina Lean Server's HTTP API, over the stand-in checker (it is not Lean).

What it reproduces:
- `POST /api/check` (and `/api/check/`) with `{"snippets": [{"id", "code"}], "timeout", "debug", "reuse",
  "infotree"}` -> `{"results": [{"id", "time", "response"} | {"id", "time", "error"}]}` (fields that are
  None left out); `GET /health` -> `{"status": "ok"}`; an empty or duplicate-id snippet list is a 422;
- `Authorization: Bearer <key>` when a key is set: 401 "Missing API key" / "Invalid API key";
- the header split: leading `import` and blank lines are the header, run once per REPL slot and reused;
  the rest runs in the header's environment, and message and sorry lines are shifted by the header's line
  count so they count from the snippet's first line (`shift_header_lines=False` imitates servers from
  before that fix, whose lines count from the body);
- 429 "No available REPLs" when every REPL slot stays busy for `max_wait_s`; a snippet past `timeout`
  gets `"error": "Lean REPL command timed out in T seconds"` and its slot is replaced; a REPL crash is a
  500 for the whole request;
- faults: a queue of status codes answered before any real work (`fail_statuses`, e.g. [429, 500, 499]),
  a share of requests answered 429 (`fault_429_rate`), fixed costs per snippet and per header, and the
  markers `-- standin:hang` / `-- standin:crash` in a snippet.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from verifiers.lean.testing.engine import StandinLean


class KiminaStandinConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_repls: int = Field(4, ge=1, description="REPL slots; a snippet that finds none free waits max_wait_s.")
    max_wait_s: float = Field(60.0, ge=0, description="How long a snippet waits for a slot before a 429 "
                              "(Kimina's default wait is 60 s).")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer API_KEY`.")
    version: str = Field("4.19", description="Lean version whose quirks to imitate (sorry quoting).")
    shift_header_lines: bool = Field(True, description="Shift message lines by the header (current Kimina).")
    cost_ms: float = Field(0.0, ge=0, description="Milliseconds each snippet body takes.")
    header_cost_ms: float = Field(0.0, ge=0, description="Milliseconds a header takes on a slot the first time.")
    fail_statuses: list[int] = Field(default_factory=list, description="Statuses answered, in order, to the "
                                     "first requests (e.g. [429, 500]).")
    fault_429_rate: float = Field(0.0, ge=0, le=1, description="Share of requests answered 429.")
    seed: int = Field(0, description="Seed of the random faults.")


def split_header(code: str) -> tuple[str, str, int]:
    """Kimina's split: (header of import lines, body, header line count). Leading blank and `import` lines
    are the header; `import Mathlib…` lines collapse to one `import Mathlib`; duplicates are dropped."""
    lines = code.splitlines()
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("import ")):
        i += 1
    imports: list[str] = []
    mathlib = False
    for line in (x.strip() for x in lines[:i]):
        if line.startswith("import Mathlib"):
            mathlib = True
        elif line.startswith("import ") and line not in imports:
            imports.append(line)
    header = "\n".join((["import Mathlib"] if mathlib else []) + imports)
    return header, "\n".join(lines[i:]), i


class _Slot:
    def __init__(self, version: str) -> None:
        self.lean = StandinLean(version)
        self.headers: dict[str, int] = {}


class KiminaStandin:
    def __init__(self, config: KiminaStandinConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or KiminaStandinConfig()
        self.host, self.port = host, port
        self._free: list[_Slot] | None = None
        self._slot_event: asyncio.Event | None = None
        self._fail = list(self.config.fail_statuses)
        self._rng = random.Random(self.config.seed)
        self.requests = 0
        # Check requests being answered now, and the most at once: what a client-side limit (the build's
        # Lean slots) is tested against.
        self.in_flight = 0
        self.peak_in_flight = 0
        self.auth_headers: list[str | None] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def app(self) -> Any:
        app = FastAPI(title="Kimina Lean Server stand-in (not Lean)")
        cfg = self.config

        @app.get("/health")
        @app.get("/")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        async def check(request: Request) -> Any:
            self.requests += 1
            auth = request.headers.get("authorization")
            self.auth_headers.append(auth)
            if cfg.api_key is not None:
                if not auth:
                    raise HTTPException(401, "Missing API key")
                if auth.removeprefix("Bearer ").strip() != cfg.api_key:
                    raise HTTPException(401, "Invalid API key")
            body = await request.json()
            snippets = body.get("snippets") if isinstance(body, dict) else None
            if not isinstance(snippets, list) or not snippets or not all(
                    isinstance(s, dict) and isinstance(s.get("id"), str) and isinstance(s.get("code"), str)
                    for s in snippets):
                return JSONResponse({"detail": [{"msg": "`snippets` must be a non-empty list of {id, code}"}]}, 422)
            if len({s["id"] for s in snippets}) != len(snippets):
                return JSONResponse({"detail": [{"msg": "`snippets` must have unique ids"}]}, 422)
            if self._fail:
                status = self._fail.pop(0)
                raise HTTPException(status, "No available REPLs" if status == 429 else f"injected {status}")
            if cfg.fault_429_rate and self._rng.random() < cfg.fault_429_rate:
                raise HTTPException(429, "No available REPLs")
            timeout = float(body.get("timeout", 60))
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                results = await asyncio.gather(*(self._run_one(s["id"], s["code"], timeout) for s in snippets))
            finally:
                self.in_flight -= 1
            return {"results": results}

        app.post("/api/check")(check)
        app.post("/api/check/", include_in_schema=False)(check)
        return app

    async def _get_slot(self) -> _Slot:
        if self._free is None:
            self._free = [_Slot(self.config.version) for _ in range(self.config.max_repls)]
            self._slot_event = asyncio.Event()
        deadline = time.monotonic() + self.config.max_wait_s
        while not self._free:
            assert self._slot_event is not None
            self._slot_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HTTPException(429, "No available REPLs")
            try:
                await asyncio.wait_for(self._slot_event.wait(), remaining)
            except asyncio.TimeoutError:
                raise HTTPException(429, "No available REPLs") from None
        return self._free.pop()

    def _put_slot(self, slot: _Slot) -> None:
        assert self._free is not None and self._slot_event is not None
        self._free.append(slot)
        self._slot_event.set()

    async def _run_one(self, sid: str, code: str, timeout: float) -> dict[str, Any]:
        header, body, offset = split_header(code)
        slot = await self._get_slot()
        t0 = time.monotonic()
        try:
            async def work() -> dict[str, Any]:
                if header not in slot.headers:
                    if self.config.header_cost_ms:
                        await asyncio.sleep(self.config.header_cost_ms / 1000)
                    answer = slot.lean.command(header) if header else {"env": None}
                    slot.headers[header] = answer.get("env")  # type: ignore[assignment]
                if "-- standin:hang" in body:
                    await asyncio.sleep(10**6)
                if "-- standin:crash" in body:
                    raise HTTPException(500, "Lean REPL process crashed (stand-in crash fault)")
                if self.config.cost_ms:
                    await asyncio.sleep(self.config.cost_ms / 1000)
                return slot.lean.command(body, slot.headers[header])

            answer = await asyncio.wait_for(work(), timeout)
        except asyncio.TimeoutError:
            slot = _Slot(self.config.version)  # the timed-out REPL is destroyed; a fresh one takes its place
            return {"id": sid, "time": timeout, "error": f"Lean REPL command timed out in {timeout:g} seconds"}
        except HTTPException:
            slot = _Slot(self.config.version)
            raise
        finally:
            self._put_slot(slot)
        if self.config.shift_header_lines and offset and "message" not in answer:
            for key in ("messages", "sorries"):
                for entry in answer.get(key, []):
                    for pos_key in ("pos", "endPos"):
                        if isinstance(entry.get(pos_key), dict):
                            entry[pos_key]["line"] += offset
        return {"id": sid, "time": round(time.monotonic() - t0, 6), "response": answer}

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a background thread; returns the base URL."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="kimina-standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError("the Kimina stand-in did not start within 20 s")
        return self.url

    def serve_forever(self) -> None:
        import uvicorn

        uvicorn.run(self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "KiminaStandin":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
