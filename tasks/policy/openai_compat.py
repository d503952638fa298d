"""OpenAI-compatible HTTP backend: vLLM serve, SGLang, TGI, llama.cpp server and hosted APIs.

One HTTP request per `GenerationRequest` (`n` samples in it, never n copies of the prompt), at most
`max_concurrency` in flight from this process to one fleet (same base URLs and model), over every shard
task's event loop (`_FleetSlots`), spread over one or more base URLs (a fleet of replicas: each request goes
to the replica with the fewest requests in flight). Transient failures (429, 5xx, timeouts, dropped
connections) are retried with exponential backoff and full jitter, honouring `Retry-After`. A circuit
breaker per replica opens after `breaker_threshold` consecutive failure episodes (requests failing together,
all sent before the first of them failed, are one episode: a restarting server refuses every connection at
once); after `breaker_cooldown_s` one probe request is let through while the others wait for its outcome.
An outage is ridden out: while every replica is down, requests wait and probe instead of using up their
retries, and fail only after `max_outage_s` with a `PolicyError` that says what to check and the usage so
far, so the shard fails clearly and a rerun resumes from the finished shards. Each replica's state changes
(down, back) are logged once per process, not once per request or shard.

The API key is read from the environment variable named in the config (never stored in the config,
hence never in the manifest) and only ever placed in the `Authorization` header; error messages name the
variable, not its value, and any echo of the key in a server's answer is masked before it reaches an
exception or a log line. `base_url` may carry no credentials anywhere (user:key@host, `?api-key=`, a key in
the path or fragment; `storage.secrets`): the config is copied into the manifest, Prefect's flow parameters
and httpx's request log. `verify_environment` checks before any work that the named variable is set.

Stop strings: the engine ends a step at the step separator and treats a sample that ended on its own
(EOS) as a finished solution. vLLM names the matched stop string in `stop_reason` (null at EOS), SGLang
in `matched_stop` (the token id at EOS); hosted APIs and others name nothing, so `parse_response` infers
it (see `_stop_matched`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.errors import ConfigError, PolicyError
from storage.secrets import url_credential_problem
from tasks.policy.base import Completion, GenerationRequest, PolicyUsage, default_policy_id
from tasks.policy.prefix import BoundaryEncoder
from tasks.prompt import chatml_to_messages

log = logging.getLogger(__name__)
_POOL_SIZE = 8  # connections per httpx pool (see _ensure_clients)
# BOS strings of common model families. A prompt that starts with one was rendered with its BOS (a chat
# template's `{{ bos_token }}`); a server that tokenises it with add_special_tokens=True adds a second.
KNOWN_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>",
                    "<\uff5cbegin\u2581of\u2581sentence\uff5c>")


class OpenAIPolicyConfig(BaseModel):
    """A policy served over the OpenAI HTTP API (`/v1/completions` or `/v1/chat/completions`)."""

    # hide_input_in_errors: a rejected base_url may hold a key; pydantic would print it in the error.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    # Fields that change where or how fast requests go, never what comes back: left out of the build key
    # (flows.config.BuildConfig.build_key) and of the default policy id (`default_policy_id`), so a rerun
    # against another replica or port resumes and reuses the rollout cache.
    noise_fields: ClassVar[tuple[str, ...]] = (
        "base_url", "api_key_env", "max_concurrency", "max_batch", "timeout_s", "connect_timeout_s",
        "max_retries", "backoff_initial_s", "backoff_max_s", "breaker_threshold", "breaker_cooldown_s",
        "max_outage_s")

    kind: Literal["openai"] = "openai"
    base_url: list[str] = Field(
        ..., min_length=1,
        description="Server URL(s) up to and including `/v1`, e.g. http://127.0.0.1:8000/v1; several spread the "
        "load over replicas. A single string is accepted.",
    )
    model: str = Field(..., min_length=1, description="Model name as the server knows it (`model` field).")
    endpoint: Literal["completions", "chat"] = Field(
        "completions",
        description="`completions`: the rendered prompt is sent as text (any template; best for prefix caching). "
        "`chat`: ChatML-rendered prompts are sent as messages, continuing the open assistant reply.",
    )
    policy_id: str | None = Field(
        None, description="Identity of the model in rollout-cache keys and the nodes table; default "
        "`openai:ENDPOINT/MODEL@HASH`, HASH over the sampling settings (min_p, top_k, extra_body, ...; not URLs, "
        "keys, concurrency or timeouts). Set it, and change it, whenever the weights behind `model` change.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (sent as a Bearer token), e.g. "
        "`OPENAI_API_KEY`; the variable must be set (`stepforge build` checks before any work). None: no "
        "Authorization header (a local server started without a key).",
    )
    max_concurrency: int = Field(
        64, ge=1, description="Requests in flight at once from this process to the fleet (these base URLs "
        "and model), over all base URLs and every shard task running in it. Builds in other processes or on "
        "other machines have their own; `concurrency.policy_slots` bounds shard tasks everywhere.")
    max_batch: int = Field(256, ge=1, description="Requests the scheduler may hand over in one call.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout (read/write/pool), seconds.")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout, seconds.")
    max_retries: int = Field(6, ge=0, description="Retries per request after the first try (429/5xx/timeouts/"
                             "disconnects); 0 disables retrying.")
    backoff_initial_s: float = Field(0.5, gt=0, description="First backoff; doubles per retry, with full jitter.")
    backoff_max_s: float = Field(30.0, gt=0, description="Cap on one backoff (and on an honoured Retry-After).")
    breaker_threshold: int = Field(8, ge=1, description="Consecutive failures that open a replica's circuit.")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="How long an open circuit refuses requests before "
                                      "one probe request is let through (requests wait meanwhile).")
    max_outage_s: float = Field(
        60.0, ge=0, description="How long every base URL may stay unreachable (circuits open, probes failing) "
        "before requests fail and the shard with them; requests wait, without using up `max_retries`, until "
        "then. Raise it to ride out server restarts; 0: fail as soon as every circuit is open.")
    vllm_extensions: bool = Field(
        True, description="Send vLLM's extra fields (include_stop_str_in_output, skip_special_tokens, min_p, top_k); "
        "turn off for hosted APIs that reject unknown fields (stop strings are then re-attached client-side).",
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM `min_p` (None: server default).")
    top_k: int | None = Field(None, description="vLLM `top_k` (None: server default; -1 disables).")
    skip_special_tokens: bool | None = Field(None, description="vLLM `skip_special_tokens` (None: server default).")
    add_special_tokens: bool | None = Field(
        None, description="vLLM `add_special_tokens` for text prompts on /v1/completions (needs `vllm_extensions`). "
        "None: false when the prompt already starts with a BOS string (a chat template that renders "
        "`bos_token`, which would otherwise be doubled), else the server default.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Merged into every request body last.")
    tokenizer: str | None = Field(
        None, description="Local folder of the served model's tokenizer (needs `.[transformers]`). Set, prompts "
        "go to /v1/completions as token IDs, each extending its parent prompt's IDs by the new step's (as the "
        "vLLM offline backend does), so the server's prefix cache matches whole blocks instead of depending "
        "on how the text re-tokenises at step boundaries. None: text prompts.")

    def verify_environment(self) -> None:
        """Checks against the environment of the process that will send requests, cheap enough to run before
        any work: the variable named by `api_key_env` is set (a missing key is otherwise found only by a 401
        after the build has started). Raises ConfigError naming the field and the variable, never a value."""
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(
                f"`policy.api_key_env`: the environment variable `{self.api_key_env}` is not set or empty; export "
                f"the API key in it, or set `policy.api_key_env` to null for a server without keys.",
                field="policy.api_key_env", value=self.api_key_env)

    @model_validator(mode="after")
    def _token_prompts_need_completions(self) -> "OpenAIPolicyConfig":
        if self.tokenizer is not None and self.endpoint != "completions":
            raise ValueError("`policy.tokenizer` sends token-ID prompts, which only `policy.endpoint=completions` "
                             "takes; unset one of them")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_urls(cls, data: Any) -> Any:
        # A model-level check so the error carries the whole mapping as its input, which error reports
        # (flows.config.config_error) never print, rather than the URL with the secret in it.
        if not isinstance(data, dict):
            return data
        urls = data.get("base_url")
        urls = urls.split(",") if isinstance(urls, str) else urls if isinstance(urls, list) else []
        for i, url in enumerate(urls):
            problem = url_credential_problem(str(url).strip()) if isinstance(url, str) else None
            if problem:
                raise ValueError(
                    f"`policy.base_url` entry {i + 1} {problem}; the config is copied into the manifest, "
                    f"Prefect's flow parameters and request logs. Put the key in an environment variable and "
                    f"name it in `policy.api_key_env` (sent as a Bearer token) instead.")
        return data

    @field_validator("base_url", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):  # normalise form: one URL or a comma-separated list (as `--set` gives it)
            v = [u.strip() for u in v.split(",") if u.strip()]
        return v

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for n, url in enumerate(v):
            if not url.startswith(("http://", "https://")):
                # The entry is not repeated: text before an `@` could be a key typed without a scheme.
                raise ValueError(f"`policy.base_url` entry {n} must start with http:// or https://")
            if urlsplit(url).query:  # request paths are appended to the URL, which a query string would break
                raise ValueError(f"`policy.base_url` entry {n} may not have a query string; give the URL up to "
                                 "`/v1` and extra request fields in `policy.extra_body`")
        return [u.rstrip("/") for u in v]


class _Retryable(Exception):
    """A failure worth another try; `retry_after` is the server's hint in seconds, if it gave one.
    `unreachable`: the connection failed (refused, reset, dropped), i.e. the server is away rather than
    failing this request; with `policy.max_outage_s` > 0 such failures are bounded by time, not retries."""

    def __init__(self, message: str, retry_after: float | None = None, counts_for_breaker: bool = True,
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.counts_for_breaker = counts_for_breaker
        self.unreachable = unreachable


@dataclass
class _Replica:
    """One base URL and its circuit breaker: closed (open_until == 0), open (now < open_until) or half-open
    (the cooldown is over: one probe request may go; `probe` is set while it is in flight).

    Failures are counted by episode: `failure_seq` advances with every counted failure, and a request that
    was already in flight when one was counted (it saw an older `failure_seq` when sent) failed in that same
    episode, so a burst of requests failing in one instant (a restart, a full backlog) counts once."""

    url: str
    inflight: int = 0
    consecutive_failures: int = 0
    open_until: float = 0.0
    last_error: str = ""
    probe: asyncio.Future | None = None
    failure_seq: int = 0
    down_since: float | None = None  # the first failure since the replica last answered

    def usable(self, now: float) -> bool:
        """Whether a request may be sent now: closed, or half-open with no probe in flight."""
        return self.open_until == 0.0 or (self.open_until <= now and self.probe is None)


# The state last reported for each base URL, process-wide: every shard's policy object keeps its own breaker,
# but a replica going down or coming back is one event for the person reading the log, not one per shard.
_REPORTED: dict[str, str] = {}
_REPORTED_LOCK = threading.Lock()


def _report_state(url: str, state: Literal["open", "closed"], message: str, *args: Any) -> None:
    with _REPORTED_LOCK:
        if _REPORTED.get(url, "closed") == state:
            return
        _REPORTED[url] = state
    log.warning(message, *args)


class _FleetSlots:
    """At most `limit` requests in flight to one fleet from this process, shared by every shard task.

    Each shard task runs its own event loop in its own thread, so an asyncio primitive cannot be shared:
    slots are counted under a thread lock, and a freed slot is handed to the oldest waiter through its own
    loop (`call_soon_threadsafe`). A waiter cancelled after being handed a slot passes it on, so none leaks.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._used < self.limit and not self._waiters:
                self._used += 1
                return
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut)
            self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove(entry)
                    handed = False
                except ValueError:  # `release` had already given this waiter the slot
                    handed = True
            if handed:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                try:  # the slot now belongs to that waiter; its own loop wakes it
                    loop.call_soon_threadsafe(_wake, fut)
                    return
                except RuntimeError:  # its loop is closed: nobody to hand the slot to
                    continue
            self._used -= 1


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_FLEETS: dict[tuple[Any, ...], _FleetSlots] = {}
_FLEETS_LOCK = threading.Lock()


def fleet_slots(config: "OpenAIPolicyConfig") -> _FleetSlots:
    """The process-wide slots of `config`'s fleet (base URLs + model + limit)."""
    key = (tuple(config.base_url), config.model, config.max_concurrency)
    with _FLEETS_LOCK:
        slots = _FLEETS.get(key)
        if slots is None:
            slots = _FLEETS[key] = _FleetSlots(config.max_concurrency)
        return slots


def policy_id(cfg: OpenAIPolicyConfig) -> str:
    """The policy's identity (rollout-cache keys, the nodes table) from its config alone."""
    return cfg.policy_id or default_policy_id(f"openai:{cfg.endpoint}/{cfg.model}", cfg)


class OpenAIPolicy:
    # Each request is its own HTTP call with its own latency: the engine hands them over one by one and
    # routes each answer as it lands instead of holding a batch until its slowest request returns.
    independent_requests = True

    def __init__(self, config: OpenAIPolicyConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic, boundaries: Sequence[str] = ("\n",)) -> None:
        """`transport` (an `httpx.MockTransport` in tests) replaces the network; `clock` the breaker's clock."""
        self.config = config
        self.policy_id = policy_id(config)
        self.max_batch = config.max_batch
        self.usage = PolicyUsage()
        self._replicas = [_Replica(u) for u in config.base_url]
        self._rr = 0
        self._clients: list[httpx.AsyncClient] = []
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Queue[int] | None = None
        self._rng = random.Random()
        self._transport = transport
        self._clock = clock
        self._boundaries = tuple(boundaries)
        self._prefix: BoundaryEncoder | None = None  # when `config.tokenizer` is set (loaded on first use)

    # -- plumbing -------------------------------------------------------------------------------------
    def _api_key(self) -> str:
        return os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str) -> str:
        """`text` (a server's answer, an exception) with the API key masked: some servers echo the key or the
        Authorization header back in error bodies, and those bodies go into exceptions and logs."""
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _ensure_clients(self) -> None:
        loop = asyncio.get_running_loop()
        if self._clients and self._client_loop is not loop:
            # httpx clients belong to the event loop that opened them; each shard runs its own loop.
            self._clients = []
        if self._clients:
            return
        c = self.config
        self._client_loop = loop
        for r in self._replicas:  # a probe of a finished loop can never complete; let a new one go
            r.probe = None
        # Small pools instead of one big one: httpcore assigns queued requests to connections in
        # O(requests x connections), which caps one pool near 130 requests/s at 64 connections (measured,
        # benchmarks/NOTES-issue4.md). A request holds one slot; slot s uses pool s // _POOL_SIZE.
        size = min(_POOL_SIZE, c.max_concurrency)
        verify = _ssl_context()
        self._clients = [
            httpx.AsyncClient(headers=self._headers(), timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
                              verify=verify, transport=self._transport,
                              limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))
            for _ in range(-(-c.max_concurrency // size))]
        self._slots = asyncio.Queue()
        for slot in range(c.max_concurrency):
            self._slots.put_nowait(slot)

    async def aclose(self) -> None:
        if self._clients and self._client_loop is asyncio.get_running_loop():
            await asyncio.gather(*(client.aclose() for client in self._clients))
        self._clients = []

    async def _pick(self) -> tuple[_Replica, bool]:
        """A replica to send to, and whether this request is its half-open probe.

        While a probe is in flight nothing else goes to that replica: requests that find no usable replica
        wait for the probe's outcome (success closes the circuit, failure re-opens it) or for the next
        cooldown to end, and fail only when every circuit has been open for `max_outage_s` (at once when 0)."""
        while True:
            now = self._clock()
            live = [r for r in self._replicas if r.usable(now)]
            if live:
                least = min(r.inflight for r in live)
                ties = [r for r in live if r.inflight == least]
                self._rr += 1
                replica = ties[self._rr % len(ties)]
                if replica.open_until == 0.0:
                    return replica, False
                replica.probe = asyncio.get_running_loop().create_future()
                return replica, True
            probes = [r.probe for r in self._replicas if r.probe is not None]
            if probes:
                await asyncio.wait(probes, return_when=asyncio.FIRST_COMPLETED)
                continue
            deadline = self._fleet_down_since() + self.config.max_outage_s
            if self.config.max_outage_s == 0 or now >= deadline:
                raise self._outage_error(now)
            wake = min(min(r.open_until for r in self._replicas), deadline)
            await asyncio.sleep(max(0.0, wake - now))

    def _fleet_down_since(self) -> float:
        """Since when no replica has answered (every one failed since its last answer); inf: some is up."""
        marks = [r.down_since for r in self._replicas]
        return math.inf if any(m is None for m in marks) else max(m for m in marks if m is not None)

    def _outage_error(self, now: float) -> PolicyError:
        c, u = self.config, self.usage
        detail = "; ".join(f"{r.url}: {' '.join(r.last_error.split())}" for r in self._replicas)
        down = now - self._fleet_down_since()
        if c.max_outage_s > 0:
            what = (f"Policy server unreachable for {max(0.0, down):.0f} s, longer than `policy.max_outage_s` "
                    f"({c.max_outage_s:g} s): {detail}.")
            todo = "or raise `policy.max_outage_s` to wait longer"
        else:
            what = (f"Policy server unreachable: the circuit breaker is open for every base URL after "
                    f"{c.breaker_threshold} consecutive failures ({detail}).")
            todo = "or set `policy.max_outage_s` to ride out short outages"
        return PolicyError(
            f"{what} Usage of this shard so far: {u.requests} requests answered, {u.retries} retries, "
            f"{u.failures} failed. Check that the server is running and `policy.base_url` is right ({todo}); "
            f"rerun the build to resume from the finished shards.", field="policy.base_url", value=c.base_url)

    def _failed(self, replica: _Replica, exc: _Retryable, seq: int | None = None, is_probe: bool = False) -> None:
        """Record a failed request to `replica`; `seq` is the replica's `failure_seq` when it was sent."""
        replica.last_error = str(exc)
        if not exc.counts_for_breaker:  # a 429 means the server is alive, just busy
            return
        now = self._clock()
        if replica.down_since is None:
            replica.down_since = now
        if seq is not None and seq != replica.failure_seq and not is_probe:
            return  # in flight when another failure was counted: the same episode
        replica.failure_seq += 1
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.config.breaker_threshold or (is_probe and replica.open_until):
            was_closed = replica.open_until == 0.0
            replica.open_until = now + self.config.breaker_cooldown_s
            # Half-open: after the cooldown one failure (of the probe) re-opens it at once.
            replica.consecutive_failures = self.config.breaker_threshold - 1
            if was_closed:
                _report_state(replica.url, "open",
                              "policy server %s unreachable (%s): circuit open, requests wait and probe it every "
                              "%.0f s for up to %.0f s (policy.max_outage_s)", replica.url,
                              " ".join(str(exc).split()), self.config.breaker_cooldown_s, self.config.max_outage_s)

    def _answered(self, replica: _Replica) -> None:
        """The server answered (any status but 429/5xx): close the circuit."""
        if replica.down_since is not None and replica.open_until != 0.0:
            _report_state(replica.url, "closed", "policy server %s answers again after %.0f s: circuit closed",
                          replica.url, self._clock() - replica.down_since)
        replica.consecutive_failures = 0
        replica.open_until = 0.0
        replica.down_since = None

    @staticmethod
    def _probe_done(replica: _Replica, is_probe: bool) -> None:
        if is_probe and replica.probe is not None:
            probe, replica.probe = replica.probe, None
            if not probe.done():
                probe.set_result(None)  # wakes the requests waiting in _pick

    def _backoff(self, attempt: int, exc: _Retryable) -> float:
        # Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)], but never sooner
        # than the server's Retry-After.
        c = self.config
        cap = min(c.backoff_max_s, c.backoff_initial_s * 2 ** min(attempt - 1, 60))
        wait = self._rng.uniform(0, cap)
        if exc.retry_after is not None:
            wait = max(wait, min(exc.retry_after, c.backoff_max_s))
        return wait

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
        replica, is_probe = await self._pick()
        try:
            return await self._post_to(replica, client, path, body, is_probe)
        finally:
            self._probe_done(replica, is_probe)  # after _failed/_answered ran: waiters see the new state

    async def _post_to(self, replica: _Replica, client: httpx.AsyncClient, path: str,
                       body: dict[str, Any], is_probe: bool = False) -> dict[str, Any]:
        replica.inflight += 1
        seq = replica.failure_seq
        try:
            resp = await client.post(f"{replica.url}/{path}", json=body)
        except httpx.TimeoutException as exc:
            # A connect timeout means nothing listens; a read timeout, a server too slow for `timeout_s`.
            err = _Retryable(f"timeout after {self.config.timeout_s} s ({type(exc).__name__})",
                             unreachable=isinstance(exc, httpx.ConnectTimeout))
            self._failed(replica, err, seq, is_probe)
            raise err from None
        except httpx.TransportError as exc:  # refused, reset, dropped mid-response
            err = _Retryable(self._redact(f"{type(exc).__name__}: {exc}"), unreachable=True)
            self._failed(replica, err, seq, is_probe)
            raise err from None
        finally:
            replica.inflight -= 1
        if resp.status_code == 429 or resp.status_code >= 500:
            retry_after = _retry_after(resp.headers.get("retry-after"))
            err = _Retryable(f"HTTP {resp.status_code}: {self._redact(resp.text)[:200]}", retry_after,
                             counts_for_breaker=resp.status_code != 429)
            self._failed(replica, err, seq, is_probe)
            raise err
        self._answered(replica)
        if resp.status_code in (401, 403):
            where = (f"check the API key in the environment variable `{self.config.api_key_env}`"
                     if self.config.api_key_env else
                     "it wants a key: export it in a variable and name that in `policy.api_key_env`")
            raise PolicyError(f"The policy server refused the credentials (HTTP {resp.status_code}); {where}.",
                              field="policy.api_key_env")
        if resp.status_code >= 400:
            raise PolicyError(f"The policy server rejected a request (HTTP {resp.status_code}): "
                              f"{self._redact(resp.text)[:500]}", field="policy")
        try:
            return resp.json()
        except ValueError:
            raise PolicyError(f"The policy server sent a non-JSON response: {self._redact(resp.text)[:200]!r}") \
                from None

    async def _send(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """`_post` with retries: failures count against `max_retries`, except connection failures while
        `max_outage_s` > 0, which are retried until this request has met nothing else for `max_outage_s`."""
        c = self.config
        failures = attempt = 0
        unreachable_since: float | None = None
        while True:
            try:
                return await self._post(client, path, body)
            except _Retryable as exc:
                now = self._clock()
                if exc.unreachable and c.max_outage_s > 0:
                    unreachable_since = now if unreachable_since is None else unreachable_since
                    if now - unreachable_since >= c.max_outage_s:
                        raise self._outage_error(now) from None
                else:
                    unreachable_since = None
                    failures += 1
                    if failures > c.max_retries:
                        raise PolicyError(
                            f"A policy request failed {failures} times; last error: {' '.join(str(exc).split())}. "
                            f"The server may be overloaded or down; raise `policy.max_retries`/`policy.timeout_s` "
                            f"or check it, then rerun the build to resume.", field="policy.base_url") from None
                attempt += 1
                self.usage.retries += 1
                await asyncio.sleep(self._backoff(attempt, exc))

    # -- requests -------------------------------------------------------------------------------------
    def build_body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of one request; pure, so it is tested without a server."""
        c, p = self.config, req.params
        body: dict[str, Any] = {"model": c.model, "n": p.n, "temperature": p.temperature, "top_p": p.top_p,
                                "max_tokens": p.max_tokens}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if c.endpoint == "completions":
            path = "completions"
            body["prompt"] = list(req.prompt_token_ids) if req.prompt_token_ids is not None else req.prompt
            if p.logprobs:
                body["logprobs"] = 1  # the sampled token's log-prob (plus its top-1 alternative)
        else:
            path = "chat/completions"
            try:
                messages, open_reply = chatml_to_messages(req.prompt)
            except ValueError as exc:
                raise PolicyError(str(exc), field="policy.endpoint") from None
            body["messages"] = messages
            if open_reply:
                # vLLM: continue the last assistant message instead of opening a new one.
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            if p.logprobs:
                body["logprobs"] = True
        if c.vllm_extensions:
            body["include_stop_str_in_output"] = p.include_stop_str_in_output
            for key in ("min_p", "top_k", "skip_special_tokens"):
                if getattr(c, key) is not None:
                    body[key] = getattr(c, key)
            if c.endpoint == "completions" and req.prompt_token_ids is None:
                add = c.add_special_tokens
                if add is None and req.prompt.startswith(KNOWN_BOS_TOKENS):
                    add = False  # the template rendered the BOS; the server must not add another
                if add is not None:
                    body["add_special_tokens"] = add
        body.update(c.extra_body)
        return path, body

    def parse_response(self, req: GenerationRequest, data: dict[str, Any]) -> list[Completion]:
        """The n completions of one response, in sample order; pure."""
        choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
        n = req.params.n
        if len(choices) != n:
            raise PolicyError(f"The policy server returned {len(choices)} choices for n={n}; it may not support "
                              f"`n` (llama.cpp server does not), so use a server that does.", field="policy")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        cached = int(cached) if cached is not None else None
        total_completion = int(usage.get("completion_tokens") or 0)

        texts, lp_lists = [], []
        for ch in choices:
            if self.config.endpoint == "completions":
                texts.append(ch.get("text") or "")
                lp = ch.get("logprobs") or {}
                lp_lists.append([x for x in (lp.get("token_logprobs") or []) if x is not None] if lp else None)
            else:
                texts.append((ch.get("message") or {}).get("content") or "")
                lp = ch.get("logprobs") or {}
                content = lp.get("content") if lp else None
                lp_lists.append([t["logprob"] for t in content] if content else None)
        # Per-sample completion tokens: exact from log-probs when we have them, else the total split evenly
        # (servers report only the request's total); either way they add up to the reported total.
        if all(lps is not None for lps in lp_lists) and sum(len(x) for x in lp_lists) == total_completion:
            per = [len(x) for x in lp_lists]
        else:
            q, r = divmod(total_completion, n)
            per = [q + (1 if i < r else 0) for i in range(n)]

        out = []
        for ch, text, lps, ntok in zip(choices, texts, lp_lists, per):
            finish = ch.get("finish_reason") or "stop"
            stop_reason, certain = _stop_matched(ch, text, finish, req.params.stop)
            if (req.params.include_stop_str_in_output and not self.config.vllm_extensions and stop_reason
                    and certain and not text.endswith(stop_reason)):
                text += stop_reason  # emulate vLLM's flag where the server cannot do it
            want_lp = req.params.logprobs and lps is not None
            out.append(Completion(
                text=text, finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=ntok,
                mean_logprob=(sum(lps) / len(lps) if lps else None) if want_lp else None,
                token_logprobs=tuple(lps) if want_lp else None, cached_tokens=cached, stop_reason=stop_reason))
        self.usage.requests += 1
        self.usage.samples += n
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += total_completion
        self.usage.cached_tokens += cached or 0
        return out

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        self._ensure_clients()
        if self.config.tokenizer is not None:
            requests = [self._with_token_ids(r) for r in requests]
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _with_token_ids(self, req: GenerationRequest) -> GenerationRequest:
        """`req` with its prompt as token IDs, encoded piece by piece between step boundaries: the IDs depend
        on the text alone (never on which prompts were sent before, which cache hits and resumes change),
        and a child prompt, its parent plus whole steps, starts with its parent's IDs exactly."""
        if req.prompt_token_ids is not None:
            return req
        if self._prefix is None:
            try:
                import transformers
            except ImportError as exc:
                raise PolicyError("`policy.tokenizer` needs transformers: pip install 'stepforge[transformers]'",
                                  field="policy.tokenizer") from exc
            try:
                tok = transformers.AutoTokenizer.from_pretrained(self.config.tokenizer)
            except (OSError, ValueError) as exc:
                raise PolicyError(f"`policy.tokenizer` {self.config.tokenizer!r} cannot be loaded: {exc}",
                                  field="policy.tokenizer", value=self.config.tokenizer) from None
            # One per policy object, i.e. per shard thread: a fast tokenizer is not shared across threads.
            self._prefix = BoundaryEncoder(tok, self._boundaries, add_special_tokens=self.config.add_special_tokens)
        return dataclasses.replace(req, prompt_token_ids=self._prefix.encode(req.prompt))

    async def _one(self, req: GenerationRequest) -> list[Completion]:
        path, body = self.build_body(req)
        assert self._slots is not None
        fleet = fleet_slots(self.config)
        await fleet.acquire()  # at most max_concurrency in flight to this fleet from the whole process
        slot = await self._slots.get()  # and a connection pool of this policy's own (this event loop's)
        client = self._clients[slot // _POOL_SIZE]
        try:
            data = await self._send(client, path, body)
        except PolicyError:
            self.usage.failures += 1
            raise
        finally:
            self._slots.put_nowait(slot)
            fleet.release()
        return self.parse_response(req, data)


def _stop_matched(choice: dict[str, Any], text: str, finish: str, stop: Sequence[str]) -> tuple[str | None, bool]:
    """(the stop string that ended this choice or None, whether the server said so or it is visible).

    - vLLM sends `stop_reason`: the string, or null at EOS (an int for a stop token id, also EOS-like).
    - SGLang sends `matched_stop`: the string, or the token id at EOS.
    - Hosted OpenAI, TGI and others send neither. When the request had stop strings and finish_reason is
      "stop", a stop string at the end of the text (include_stop_str_in_output) names the match; else an
      EOS and a stop match look the same. We then assume the stop string matched (the first one, if there
      are several): `engine.is_final_step` still ends the solution when the step states its answer, and
      the other error only costs one more expansion, while assuming EOS would end every MCTS/OmegaPRM
      path after its first step. The guess is never re-attached to the text (`certain` is False).
    """
    if finish != "stop" or not stop:
        named = choice.get("stop_reason", choice.get("matched_stop"))
        return (named if isinstance(named, str) else None), True
    for key in ("stop_reason", "matched_stop"):
        if key in choice:
            named = choice[key]
            if isinstance(named, str):
                return named, True
            if named is not None:  # a stop token id: the model ended the sample itself
                return None, True
            if key == "stop_reason":  # vLLM reports null exactly at EOS
                return None, True
    visible = [s for s in stop if s and text.endswith(s)]
    if visible:
        return max(visible, key=len), True
    return next((s for s in stop if s), None), False


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # One context for all pools: building one per httpx client costs ~20 ms (loading the CA bundle).
    import certifi  # httpx's own CA bundle (a dependency of httpx)

    return ssl.create_default_context(cafile=certifi.where())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
