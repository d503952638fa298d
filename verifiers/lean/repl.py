"""`lean.kind=repl`: a pool of `leanprover-community/repl` processes.

The REPL reads JSON requests ended by a blank line and answers with pretty-printed JSON over several lines,
also ended by a blank line. A raw newline inside a JSON string breaks a request (the REPL joins the lines
without it; a blank line cuts the request), so every request is `json.dumps(obj) + "\n\n"`, whose strings
carry `\n` escaped. The REPL has no timeout and no memory limit of its own, so the pool enforces both:

- each process runs in its own session (process group) under RLIMIT_AS (`max_repl_mem_mb`), set by a small
  Python launcher that then execs the command, so no `preexec_fn` runs in this threaded process;
- a request that runs past its wall-clock limit gets the whole process group SIGKILLed; the process is
  discarded and a new one started on the next demand; the proof's verdict is `timeout`;
- a process that dies (crash, out of memory) is discarded; the proof is retried on a fresh process
  `crash_retries` times, then its verdict is `error` with the end of the process's stderr;
- a process is recycled after `max_repl_uses` proofs (the REPL keeps every environment it ever made);
- at most `max_repls` processes; a proof that finds none free within `max_wait_s` gets an `error` verdict
  saying the pool is overloaded. A new process's slot is reserved before the lock is released, so the
  pool never overshoots its limit while processes start.

Each process keeps one environment per import header: the header runs once (`{"cmd": header}`) and every
proof with that header runs as `{"cmd": body, "env": <that env>}`. A free process already holding the
header is preferred, then a new process, then any free one.

The pool runs its processes on one private event-loop thread, so any number of callers on any event loop
(the flow's shard threads each have their own) share one set of processes and one set of limits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Literal, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.errors import StepforgeError
from storage.secrets import env_secret_problem
from verifiers.base import Verdict
from verifiers.lean.base import LeanItem
from verifiers.lean.verdict import (LeanOutcome, error_outcome, lean_verdict, parse_command_response,
                                    timeout_outcome)

log = logging.getLogger(__name__)
NAME = "lean-repl"
T = TypeVar("T")

# Runs as `python -c _LAUNCHER <bytes|0> <command...>`: sets the address-space cap, then becomes the REPL
# (same pid, so killing the process group kills the REPL and anything it started).
_LAUNCHER = (
    "import os, resource, sys\n"
    "cap = int(sys.argv[1])\n"
    "if cap: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write(f'cannot start {sys.argv[2]!r}: {e.strerror}\\n'); sys.exit(127)\n"
)
_STREAM_LIMIT = 1 << 26  # one response line may be long (infotrees, big goals)


# Every live pool, so the processes (each in its own session, hence not killed with this process) are
# killed when the interpreter exits, whoever forgot to close the pool.
_LIVE: "weakref.WeakSet[ReplPool]" = weakref.WeakSet()
# Pools shared by every verifier built from the same config in this process (a build's shard tasks), so
# each process elaborates its header once per build, not once per shard.
_SHARED: dict[str, "ReplPool"] = {}
_SHARED_LOCK = threading.Lock()


@atexit.register
def _kill_all() -> None:
    for pool in list(_LIVE):
        pool.kill_now()


class LeanPoolOverloaded(StepforgeError):
    """No REPL process became free within `max_wait_s`."""


class ReplCrashed(StepforgeError):
    """The REPL process ended (crash, out of memory) or closed its output mid-answer."""


class ReplProtocolError(StepforgeError):
    """The REPL answered something that is not the protocol's JSON; the stream can no longer be trusted."""


class LeanReplConfig(BaseModel):
    """A pool of `leanprover-community/repl` processes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["repl"] = "repl"
    command: list[str] = Field(default_factory=lambda: ["lake", "env", "repl"], min_length=1,
                               description="The REPL command, run in `cwd`; e.g. `lake env /path/to/repl/.lake/"
                               "build/bin/repl` inside a Mathlib project, or the stand-in: `stepforge "
                               "serve-lean --protocol repl`.")
    cwd: str | None = Field(None, description="Working directory of the REPL (the Lean project); None: current.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the REPL "
                                "(e.g. `LEAN_PATH`). Not for secrets: the config is a Prefect flow parameter, "
                                "stored and shown by the server, so names or values that look like a credential "
                                "are refused; export those in the environment of the process (or worker) that "
                                "runs the build instead, which the REPL inherits.")
    max_repls: int = Field(4, ge=1, le=512, description="Processes at most (each holds Mathlib: ~several GB).")
    max_repl_uses: int | None = Field(200, ge=1, description="Proofs per process before it is replaced; None: "
                                      "never (the REPL keeps every environment, so memory only grows).")
    max_repl_mem_mb: int | None = Field(16384, ge=16, description="Address-space cap (RLIMIT_AS) per process "
                                        "in MiB; None: no cap. Lean reserves far more than it touches: keep "
                                        "it generous.")
    timeout_s: float = Field(60.0, gt=0, description="Wall-clock limit per proof; past it the process group is "
                             "killed and replaced, and the verdict is `timeout`.")
    header_timeout_s: float = Field(300.0, gt=0, description="Wall-clock limit for elaborating a header "
                                    "(`import Mathlib` takes seconds to minutes on a cold cache).")
    max_wait_s: float = Field(60.0, ge=0, description="How long a proof may wait for a free process before its "
                                 "verdict is `error` (pool overloaded).")
    crash_retries: int = Field(1, ge=0, le=5, description="Fresh processes a proof is retried on after the one "
                               "running it died (a timeout is never retried).")


    @field_validator("env")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        # Refused, not masked: Prefect stores flow parameters before any stepforge code could mask them.
        for name, value in env.items():
            problem = env_secret_problem(name, value)
            if problem is not None:
                raise ValueError(f"{problem}; this config becomes Prefect flow-run parameters (stored by the "
                                 f"server, shown in the UI), so keep secrets out of it: export {name} in the "
                                 "environment of the build's process or worker instead (the REPL inherits it)")
        return env


@dataclass(eq=False)
class _Process:
    proc: asyncio.subprocess.Process
    stderr: Any  # a temporary file: a pipe nobody reads could fill up and stall the REPL
    headers: dict[str, int] = field(default_factory=dict)
    uses: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, n: int = 400) -> str:
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - n))
            return self.stderr.read().decode("utf-8", errors="replace").strip()
        except (OSError, ValueError):
            return ""

    async def request(self, obj: dict[str, Any], timeout: float) -> Any:
        """One request and its answer; raises TimeoutError, ReplCrashed or ReplProtocolError."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        data = (json.dumps(obj, ensure_ascii=False) + "\n\n").encode("utf-8")

        async def exchange() -> Any:
            try:
                self.proc.stdin.write(data)
                await self.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ReplCrashed(f"the REPL closed its input ({type(exc).__name__})") from None
            lines: list[bytes] = []
            while True:
                try:
                    line = await self.proc.stdout.readline()
                except ValueError:  # a line beyond the stream limit
                    raise ReplProtocolError(f"a response line longer than {_STREAM_LIMIT} bytes") from None
                if not line:
                    raise ReplCrashed("the REPL closed its output")
                if not line.strip():
                    if lines:
                        break
                    continue  # blank lines before an answer are separators, not answers
                lines.append(line)
            text = b"".join(lines).decode("utf-8", errors="replace")
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ReplProtocolError(f"the REPL answered with invalid JSON ({exc.msg}): {text[:200]!r}") from None

        return await asyncio.wait_for(exchange(), timeout)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 10)
        with contextlib.suppress(Exception):
            self.stderr.close()


class ReplPool:
    """Processes of one REPL command with stated limits (keyword-only, logged when the pool starts)."""

    def __init__(self, command: Sequence[str], *, max_repls: int, max_repl_uses: int | None,
                 max_repl_mem_mb: int | None, timeout_s: float, header_timeout_s: float, max_wait_s: float,
                 crash_retries: int = 1, cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        if max_repls < 1:
            raise ValueError(f"max_repls must be >= 1, got {max_repls}")
        self.command = list(command)
        self.max_repls = max_repls
        self.max_repl_uses = max_repl_uses
        self.max_repl_mem_mb = max_repl_mem_mb
        self.timeout_s = timeout_s
        self.header_timeout_s = header_timeout_s
        self.max_wait_s = max_wait_s
        self.crash_retries = crash_retries
        self.cwd = cwd
        self.env = dict(env or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._cond: asyncio.Condition | None = None
        self._free: list[_Process] = []
        self._busy: set[_Process] = set()
        self._count = 0  # processes alive or reserved (starting)
        self.stats = {"started": 0, "killed_timeout": 0, "crashed": 0, "recycled": 0, "overloaded": 0}
        _LIVE.add(self)

    @classmethod
    def from_config(cls, cfg: LeanReplConfig) -> "ReplPool":
        return cls(cfg.command, max_repls=cfg.max_repls, max_repl_uses=cfg.max_repl_uses,
                   max_repl_mem_mb=cfg.max_repl_mem_mb, timeout_s=cfg.timeout_s,
                   header_timeout_s=cfg.header_timeout_s, max_wait_s=cfg.max_wait_s,
                   crash_retries=cfg.crash_retries, cwd=cfg.cwd, env=cfg.env)

    # --- the private loop ----------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    self._cond = asyncio.Condition()
                    ready.set()
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="lean-repl-pool", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
                log.info("Lean REPL pool: max_repls=%d, max_repl_uses=%s, max_repl_mem=%s MiB, timeout=%.0f s, "
                         "header_timeout=%.0f s, max_wait=%.0f s, crash_retries=%d, command=%s",
                         self.max_repls, self.max_repl_uses, self.max_repl_mem_mb, self.timeout_s,
                         self.header_timeout_s, self.max_wait_s, self.crash_retries, " ".join(self.command))
            return self._loop

    async def _on_pool(self, coro: Awaitable[T]) -> T:
        loop = self._ensure_loop()
        fut = asyncio.run_coroutine_threadsafe(coro, loop)  # type: ignore[arg-type]
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    # --- processes ------------------------------------------------------------------------------------

    async def _spawn(self) -> _Process:
        cap = (self.max_repl_mem_mb or 0) * 2**20
        err = tempfile.TemporaryFile()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _LAUNCHER, str(cap), *self.command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err, cwd=self.cwd, env={**os.environ, **self.env},
                start_new_session=True, limit=_STREAM_LIMIT)
        except BaseException:
            err.close()
            raise
        self.stats["started"] += 1
        return _Process(proc, err)

    async def _acquire(self, header: str) -> _Process:
        assert self._cond is not None
        deadline = time.monotonic() + self.max_wait_s
        async with self._cond:
            while True:
                warm = [p for p in self._free if header in p.headers]
                if warm or (self._free and self._count >= self.max_repls):
                    proc = (warm or self._free)[0]
                    self._free.remove(proc)
                    self._busy.add(proc)
                    return proc
                if self._count < self.max_repls:
                    self._count += 1  # reserved under the lock: concurrent starts cannot overshoot
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stats["overloaded"] += 1
                    raise LeanPoolOverloaded(
                        f"Lean REPL pool overloaded: no process free within {self.max_wait_s:g} s "
                        f"(max_repls={self.max_repls}); raise `verifier.lean.max_repls` or "
                        f"`verifier.lean.max_wait_s`, or send fewer proofs at once.")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), remaining)
        try:
            proc = await self._spawn()
        except BaseException:
            async with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        async with self._cond:
            self._busy.add(proc)
        return proc

    async def _release(self, proc: _Process, healthy: bool) -> None:
        assert self._cond is not None
        retire = not healthy or (self.max_repl_uses is not None and proc.uses >= self.max_repl_uses)
        if retire:
            if healthy:
                self.stats["recycled"] += 1
            await proc.kill()
        async with self._cond:
            self._busy.discard(proc)
            if retire:
                self._count -= 1
            else:
                self._free.append(proc)
            self._cond.notify()

    async def _header_env(self, proc: _Process, header: str) -> int | None:
        if not header:
            return None
        if header in proc.headers:
            return proc.headers[header]
        answer = await proc.request({"cmd": header}, self.header_timeout_s)
        outcome = parse_command_response(answer)
        if outcome.error is not None or outcome.errors or outcome.env is None:
            first = outcome.error or (outcome.errors[0].data if outcome.errors else "no env in the answer")
            raise _HeaderFailed(f"the header failed to elaborate: {first[:300]}")
        proc.headers[header] = outcome.env
        return outcome.env

    # --- checking --------------------------------------------------------------------------------------

    async def _check(self, item: LeanItem) -> LeanOutcome:
        for attempt in range(self.crash_retries + 1):
            t0 = time.monotonic()
            try:
                proc = await self._acquire(item.header)
            except LeanPoolOverloaded as exc:
                return error_outcome(str(exc))
            healthy = False
            try:
                stage = "header"
                env = await self._header_env(proc, item.header)
                stage = "proof"
                request: dict[str, Any] = {"cmd": item.body}
                if env is not None:
                    request["env"] = env
                answer = await proc.request(request, self.timeout_s)
                proc.uses += 1
                outcome = parse_command_response(answer, time.monotonic() - t0)
                # A REPL-level error (unknown env...) leaves the process usable; the answer was well-formed.
                healthy = True
                return outcome
            except asyncio.TimeoutError:
                self.stats["killed_timeout"] += 1
                limit = self.header_timeout_s if stage == "header" else self.timeout_s
                return timeout_outcome(f"Lean REPL {stage} timed out after {limit:g} s (process group killed, "
                                       f"pid {proc.pid})", time.monotonic() - t0)
            except _HeaderFailed as exc:
                healthy = True
                return error_outcome(str(exc), time.monotonic() - t0)
            except ReplCrashed as exc:
                self.stats["crashed"] += 1
                await asyncio.sleep(0)
                rc = proc.proc.returncode
                with contextlib.suppress(asyncio.TimeoutError):
                    rc = await asyncio.wait_for(proc.proc.wait(), 2)
                detail = (f"Lean REPL process {proc.pid} died during the {stage} ({exc}; exit code {rc}"
                          f"{', out of memory?' if 'memory' in proc.stderr_tail().lower() else ''}): "
                          f"{proc.stderr_tail(300) or 'no stderr'}")
                if attempt < self.crash_retries:
                    log.warning("%s; retrying on a fresh process", detail)
                    continue
                return error_outcome(detail, time.monotonic() - t0)
            except ReplProtocolError as exc:
                return error_outcome(f"Lean REPL protocol error: {exc}", time.monotonic() - t0)
            finally:
                await self._release(proc, healthy)
        raise AssertionError("unreachable")

    async def check(self, item: LeanItem) -> LeanOutcome:
        """Checks one proof; never raises for anything the REPL or the pool does."""
        return await self._on_pool(self._check(item))

    async def check_many(self, items: Sequence[LeanItem]) -> list[LeanOutcome]:
        async def all_() -> list[LeanOutcome]:
            return list(await asyncio.gather(*(self._check(i) for i in items)))

        return await self._on_pool(all_())

    @contextlib.asynccontextmanager
    async def session(self, header: str = "") -> AsyncIterator["ReplSession"]:
        """One process held for a sequence of requests (tactic mode: proof states live in one process)."""
        proc = await self._on_pool(self._acquire(header))
        s = ReplSession(self, proc)
        try:
            try:
                s.env = await self._on_pool(self._header_env(proc, header))
            except BaseException:
                s.healthy = False  # a header cut short leaves the process mid-answer: replace it
                raise
            yield s
        finally:
            await self._on_pool(self._release(proc, s.healthy))

    @classmethod
    def shared(cls, cfg: LeanReplConfig) -> "ReplPool":
        """The process-wide pool for `cfg` (created on first use, closed at exit)."""
        key = cfg.model_dump_json()
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls.from_config(cfg)
            return _SHARED[key]

    def kill_now(self) -> None:
        """Kills every process group at once, from any thread, without the event loop (interpreter exit)."""
        for p in [*self._free, *self._busy]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)

    @property
    def size(self) -> int:
        return self._count

    def pids(self) -> list[int]:
        return sorted(p.pid for p in [*self._free, *self._busy])

    async def aclose(self) -> None:
        if self._loop is None:
            return

        async def close_all() -> None:
            assert self._cond is not None
            async with self._cond:
                procs = [*self._free, *self._busy]
                self._free.clear()
                self._busy.clear()
                self._count = 0
            await asyncio.gather(*(p.kill() for p in procs))

        await self._on_pool(close_all())
        loop, self._loop = self._loop, None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)


class _HeaderFailed(Exception):
    pass


class ReplSession:
    """Requests on one held process. A timeout or crash marks the process for replacement and raises."""

    def __init__(self, pool: ReplPool, proc: _Process) -> None:
        self._pool = pool
        self._proc = proc
        self.env: int | None = None
        self.healthy = True

    async def request(self, obj: dict[str, Any], timeout_s: float | None = None) -> Any:
        if not self.healthy:
            raise ReplCrashed("this session's process was already lost")
        try:
            return await self._pool._on_pool(self._proc.request(obj, timeout_s or self._pool.timeout_s))
        except BaseException:  # timeout, crash, protocol error, cancellation: the stream is out of step
            self.healthy = False
            raise

    async def command(self, body: str) -> Any:
        obj: dict[str, Any] = {"cmd": body}
        if self.env is not None:
            obj["env"] = self.env
        return await self.request(obj)

    async def tactic(self, proof_state: int, tactic: str) -> Any:
        return await self.request({"tactic": tactic, "proofState": proof_state})


class LeanReplVerifier:
    """`Verifier` over a `ReplPool`: one verdict per `LeanItem`, by the rules in `verdict.py`."""

    name = NAME

    def __init__(self, config: LeanReplConfig | None = None, pool: ReplPool | None = None, *,
                 shared: bool = False) -> None:
        """`shared`: use the process-wide pool of this config (kept across verifiers; `aclose` leaves it)."""
        self.config = config or LeanReplConfig()
        self._owns_pool = pool is None and not shared
        self.pool = pool or (ReplPool.shared(self.config) if shared else ReplPool.from_config(self.config))
        self.version = "repl-json-1"

    async def check(self, batch: Sequence[LeanItem]) -> list[LeanOutcome]:
        return await self.pool.check_many(batch)

    async def verify(self, batch: Sequence[LeanItem]) -> list[Verdict]:
        return [lean_verdict(o, verifier=self.name, version=self.version) for o in await self.check(batch)]

    async def aclose(self) -> None:
        if self._owns_pool:
            await self.pool.aclose()
