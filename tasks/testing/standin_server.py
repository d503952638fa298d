"""A stand-in OpenAI-compatible server: the simulated policy over real HTTP on loopback, with faults.

It answers `/v1/completions`, `/v1/chat/completions` (ChatML, `continue_final_message`), `/v1/models` and
`/health` the way vLLM does (`n`, `seed`, `stop`, `include_stop_str_in_output`, `logprobs`, `usage` with
`prompt_tokens_details.cached_tokens` from a simulated prefix cache), so the OpenAI backend, its retries
and its circuit breaker are exercised end to end without a GPU. Each sample i of a request with seed s is
exactly `SimulatedPolicy.sample(prompt, s, i)`, so a build through the server labels the same as in-process;
with `code_steps` the policy writes rStar-style code-augmented steps (`<code>print(a op x)</code>` after each
equation), so the code step check runs over HTTP as it does in-process.

Faults are injected on a deterministic schedule: with `fault_rate` r, request number c (counting every
request received) is faulty when floor(c·r) > floor((c−1)·r), i.e. evenly spaced, so a retried request
lands on a clean slot and a run with faults is reproducible. Faulty requests cycle through `fault_kinds`:
`5xx` (503), `429` (with `Retry-After`), `slow` (answers after `slow_s`, past a client's timeout) and
`drop` (closes the connection without answering). `die_after` makes the server stop listening and drop
every connection after that many requests, like a crashed replica.

It is a small asyncio HTTP/1.1 server with keep-alive rather than uvicorn: dropping a connection
mid-request and dying on cue need control of the socket that an ASGI app does not have.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.policy.prefix import PrefixIndex
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.policy.simulated_base import approx_tokens as _tokens
from tasks.policy.simulated_author import SimulatedAuthor, SimulatedAuthorConfig
from tasks.policy.simulated_judge import SimulatedJudge, SimulatedJudgeConfig
from tasks.policy.simulated_prover import SimulatedProver, SimulatedProverConfig
from tasks.prompt import load_template, render_chat
from storage.render import StepFormat

log = logging.getLogger(__name__)

FaultKind = Literal["5xx", "429", "slow", "drop"]


class StandinServerConfig(BaseModel):
    """What the stand-in serves and how badly it behaves."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("simulated-arith", description="Model name the server answers to (others get 404).")
    step_error_rate: float = Field(0.1, ge=0.0, le=1.0, description="The simulated policy's step error rate.")
    recovery_rate: float = Field(0.0, ge=0.0, le=1.0, description="The simulated policy's `recovery_rate` (silent "
                                 "returns to the right value after a mistake; 0 = off).")
    lucky_rate: float = Field(0.0, ge=0.0, le=1.0, description="The simulated policy's `lucky_rate` (wrong chains "
                              "ending on the gold answer; 0 = off).")
    separator: str = Field("\n", description="Step separator the simulated policy writes and reads.")
    code_steps: bool = Field(False, description="The simulated policy's `code_steps`: each step also carries its "
                             "computation as inline Python in code markers (rStar-Math style), for `code-check`.")
    latency_s: float = Field(0.0, ge=0.0, description="Seconds each request takes before it is answered.")
    latency_jitter: float = Field(
        0.0, ge=0.0, le=1.0, description="Latency varies uniformly in L·(1 ± jitter), seeded by the request "
        "number; the mean stays L. Real servers vary, which keeps concurrent requests from moving in lockstep.")
    fault_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests that get a fault.")
    fault_kinds: list[FaultKind] = Field(default_factory=lambda: ["5xx", "429", "slow", "drop"],
                                         description="Faults to cycle through.")
    retry_after_s: float = Field(0.05, ge=0.0, description="`Retry-After` of injected 429s (seconds).")
    slow_s: float = Field(5.0, ge=0.0, description="How long a `slow` fault holds the response.")
    die_after: int | None = Field(None, ge=0, description="Stop serving after this many requests (a crash).")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer API_KEY` (401 otherwise).")
    tokenizer: str | None = Field(None, description="Tokenizer folder: token-ID prompts are decoded with it, as vLLM "
                                  "does with the served model's tokenizer. None: text prompts only.")
    judge_model: str | None = Field(None, description="Also answer to this model name, as the simulated judge "
                                    "(tasks/policy/simulated_judge.py). None: the policy only.")
    judge_accuracy: float = Field(0.8, ge=0.0, le=1.0, description="The simulated judge's accuracy.")
    judge_malformed_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of malformed judge answers.")
    author_model: str | None = Field(None, description="Also answer to this model name, as the MUSTARD flow's "
                                     "simulated author (tasks/policy/simulated_author.py). None: not served.")
    author_mistake_rate: float = Field(0.2, ge=0.0, le=1.0, description="The simulated author's mistake_rate.")
    author_fix_rate: float = Field(0.8, ge=0.0, le=1.0, description="The simulated author's fix_rate.")
    prover_model: str | None = Field(None, description="Also answer to this model name, as the simulated Lean prover "
                                     "of the formal domain (tasks/policy/simulated_prover.py, with "
                                     "`step_error_rate` and `recovery_rate`). None: not served.")


@dataclass
class ServerStats:
    requests: int = 0
    answered: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    samples: int = 0
    token_prompts: int = 0  # requests whose prompt came as token IDs
    token_prompt_ids: list[list[int]] = field(default_factory=list)  # the first 10,000 of them, for tests


class _Drop(Exception):
    pass


class StandinServer:
    """Start with `start()` (background thread, returns the base URL) or `serve_forever()` (CLI)."""

    def __init__(self, config: StandinServerConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or StandinServerConfig()
        self.host, self.port = host, port
        self.stats = ServerStats()
        self._fmt = StepFormat(separator=self.config.separator)
        self._policy = SimulatedPolicy(SimulatedPolicyConfig(
            step_error_rate=self.config.step_error_rate, recovery_rate=self.config.recovery_rate,
            lucky_rate=self.config.lucky_rate, code_steps=self.config.code_steps), self._fmt)
        self._judge = SimulatedJudge(SimulatedJudgeConfig(accuracy=self.config.judge_accuracy,
                                                          malformed_rate=self.config.judge_malformed_rate))
        self._author = SimulatedAuthor(SimulatedAuthorConfig(mistake_rate=self.config.author_mistake_rate,
                                                             fix_rate=self.config.author_fix_rate))
        self._prover = SimulatedProver(SimulatedProverConfig(step_error_rate=self.config.step_error_rate,
                                                             recovery_rate=self.config.recovery_rate), self._fmt)
        self._chatml = load_template("chatml")
        self._tokenizer: Any = None
        if self.config.tokenizer is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer)
        self._prefixes: PrefixIndex[int] = PrefixIndex((self.config.separator,))
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.dead = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def set_faults(self, **changes: Any) -> None:
        """Switch faults or latency while serving (e.g. `set_faults(fault_rate=0.1)`)."""
        self.config = self.config.model_copy(update=changes)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def _start(self) -> None:
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_async(self, on_ready: Callable[[str], None] | None = None) -> None:
        await self._start()
        if on_ready is not None:
            on_ready(self.base_url)
        assert self._stopped is not None
        await self._stopped.wait()
        await self._close()

    def start(self) -> str:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            self._started.set()
            self._loop.run_until_complete(self._stopped.wait())
            self._loop.run_until_complete(self._close())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="standin-policy-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("stand-in server did not start")
        return self.base_url

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        handlers = [t for t in self._handlers if not t.done()]
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def die(self) -> None:
        """Stop listening and drop every connection now (the server process crashed)."""
        self.dead = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._close()))

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "StandinServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while not self.dead:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                try:
                    status, payload, extra = await self._route(method, target.split("?")[0], headers, body)
                except _Drop:
                    writer.transport.abort()
                    return
                data = json.dumps(payload).encode()
                keep = headers.get("connection", "").lower() != "close"
                hdrs = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}", "Content-Type: application/json",
                        f"Content-Length: {len(data)}", f"Connection: {'keep-alive' if keep else 'close'}"]
                hdrs += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(hdrs) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            # Shutdown cancels handlers; ending normally keeps asyncio's stream callback from logging it.
            return
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    def _fault(self, count: int) -> str | None:
        r = self.config.fault_rate
        if r <= 0 or not self.config.fault_kinds:
            return None
        slot = math.floor(count * r)
        if slot <= math.floor((count - 1) * r):
            return None
        return self.config.fault_kinds[(slot - 1) % len(self.config.fault_kinds)]

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes
                     ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path in ("/health", "/v1/health"):
            return 200, {"status": "ok"}, {}
        if self.config.api_key is not None and headers.get("authorization") != f"Bearer {self.config.api_key}":
            return 401, _error("invalid or missing API key", "authentication_error"), {}
        if method == "GET" and path == "/v1/models":
            names = [self.config.model] + [m for m in (self.config.judge_model, self.config.author_model,
                                                       self.config.prover_model) if m]
            return 200, {"object": "list", "data": [{"id": name, "object": "model"} for name in names]}, {}
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return 404, _error(f"no route {method} {path}", "not_found"), {}

        self.stats.requests += 1
        count = self.stats.requests
        if self.config.die_after is not None and count > self.config.die_after:
            self.die()
            raise _Drop
        fault = self._fault(count)
        if fault:
            self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
        if self.config.latency_s:
            jitter = self.config.latency_jitter * (2 * random.Random(count).random() - 1)
            await asyncio.sleep(self.config.latency_s * (1 + jitter))
        if fault == "5xx":
            return 503, _error("injected fault: service unavailable", "server_error"), {}
        if fault == "429":
            return 429, _error("injected fault: rate limited", "rate_limit"), \
                {"Retry-After": f"{self.config.retry_after_s:g}"}
        if fault == "drop":
            raise _Drop
        if fault == "slow":
            await asyncio.sleep(self.config.slow_s)

        try:
            req = json.loads(body)
        except ValueError:
            return 400, _error("body is not JSON", "invalid_request_error"), {}
        if req.get("model") not in (self.config.model, self.config.judge_model, self.config.author_model,
                                    self.config.prover_model):
            return 404, _error(f"The model `{req.get('model')}` does not exist.", "NotFoundError"), {}
        try:
            payload = self._complete(req, chat=path.endswith("chat/completions"))
        except (KeyError, TypeError, ValueError) as exc:
            return 400, _error(f"bad request: {exc}", "invalid_request_error"), {}
        self.stats.answered += 1
        return 200, payload, {}

    def _complete(self, req: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        if chat:
            messages = req["messages"]
            if req.get("continue_final_message"):
                if not messages or messages[-1]["role"] != "assistant":
                    raise ValueError("continue_final_message needs a final assistant message")
                prompt = render_chat(self._chatml, messages[:-1], messages[-1]["content"])
            else:
                prompt = render_chat(self._chatml, messages, None)
        else:
            prompt = req["prompt"]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                if self._tokenizer is None:
                    raise ValueError("token-ID prompts need the server started with a tokenizer (--tokenizer)")
                self.stats.token_prompts += 1
                if len(self.stats.token_prompt_ids) < 10_000:
                    self.stats.token_prompt_ids.append(list(prompt))
                prompt = self._tokenizer.decode(prompt)
            elif not isinstance(prompt, str):
                raise ValueError("`prompt` must be a string or a list of token IDs")
        n = int(req.get("n", 1))
        stop = req.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        want_lp = bool(req.get("logprobs"))
        choices = []
        completion_tokens = 0
        model = req.get("model")
        sampler: Any = self._policy
        if self.config.judge_model is not None and model == self.config.judge_model:
            sampler = self._judge
        elif self.config.author_model is not None and model == self.config.author_model:
            sampler = self._author
        elif self.config.prover_model is not None and model == self.config.prover_model:
            sampler = self._prover
        for i in range(n):
            c = sampler.sample(prompt, req.get("seed"), i, stop, bool(req.get("include_stop_str_in_output")),
                                    int(req.get("max_tokens", 16)), logprobs=True)
            completion_tokens += c.completion_tokens
            # The simulated policy has one log-prob per step; it is reported as one "token" per step, which
            # keeps the backend's mean log-prob equal to the in-process one.
            lps = list(c.token_logprobs or [])
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                choice["logprobs"] = {"content": [{"token": f"<step{j}>", "logprob": x} for j, x in
                                                  enumerate(lps)]} if want_lp else None
            else:
                choice["text"] = c.text
                choice["logprobs"] = {"tokens": [f"<step{j}>" for j in range(len(lps))], "token_logprobs": lps,
                                      "top_logprobs": None, "text_offset": []} if want_lp else None
            choices.append(choice)
        prompt_tokens = _tokens(prompt)
        hit = self._prefixes.longest_prefix(prompt)
        cached = hit[1] if hit else 0
        self._prefixes.put(prompt, prompt_tokens)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.cached_tokens += cached
        self.stats.samples += n
        return {"id": f"cmpl-{self.stats.requests}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": cached}}}


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            503: "Service Unavailable"}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}, "object": "error"}
