"""The shard scheduler: every tree of a shard runs as its own coroutine, and all their policy and
verifier requests are gathered into batches, so a tree never waits alone for the GPU.

Algorithms are written as plain sequential async code per tree (`await engine.rollouts(...)`); the
batchers below collect whatever all trees asked for while the event loop was busy and submit it as one
batch (split only by the backend's `max_batch`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from storage.render import Segment, count_steps, segment
from tasks.policy.base import Completion, GenerationRequest, Policy, SamplingParams, derive_seed
from tasks.problem import Problem
from tasks.prompt import PromptConfig
from tasks.domains import outcome_item
from tasks.search.rollout_cache import RolloutCache, cache_key
from tasks.search.tree import Prefix
from verifiers.base import Status, Verdict, Verifier

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Collects items submitted by many coroutines and runs them through `fn` in batches."""

    def __init__(self, fn: Callable[[list[T]], Awaitable[list[R]]], max_batch: int, *, each: bool = False) -> None:
        self._fn = fn
        self._max_batch = max(1, max_batch)
        # `each`: the backend serves requests independently (an HTTP server with its own concurrency), so an
        # item goes out the moment it is submitted, as a call of its own, and its answer goes straight back to
        # the tree that asked: a tree waits neither for the other trees to have their say (their CPU between
        # two requests) nor for the slowest request of someone else's batch. Batching backends (a local GPU
        # engine) get everything pending, in chunks of `max_batch`, one call per chunk.
        self._each = each
        # Each item with its waiter: a future (`submit`) or (group, index) (`submit_many`).
        self._pending: list[tuple[T, Any]] = []
        self._flushing = False
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        if self._each:
            return await self._one(item)
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """``[await submit(x) for x in items]`` at once, in order, with one future for all of them (a gather of
        ``submit`` coroutines made a task and a future per item: most of the verifier's scheduling cost). The
        items may still land in different chunks; the group's future is set when its last answer is in."""
        if not items:
            return []
        if self._each:
            return list(await asyncio.gather(*(self._one(item) for item in items)))
        loop = asyncio.get_running_loop()
        group = _Group(loop.create_future(), len(items))
        self._pending.extend((item, (group, i)) for i, item in enumerate(items))
        if not self._flushing:
            self._flushing = True
            loop.create_task(self._flush())
        return await group.fut

    async def _one(self, item: T) -> R:
        """One item as a call of its own, awaited by its submitter: no task, no future, no flush."""
        self.batches += 1
        self.items += 1
        results = await self._fn([item])
        if len(results) != 1:
            raise RuntimeError(f"batch function returned {len(results)} results for 1 item")
        return results[0]

    async def _flush(self) -> None:
        # Yield until no coroutine adds anything more: then every runnable tree has had its say.
        seen = -1
        while seen != len(self._pending):
            seen = len(self._pending)
            await asyncio.sleep(0)
        batch, self._pending = self._pending, []
        self._flushing = False
        chunks = [batch[i : i + self._max_batch] for i in range(0, len(batch), self._max_batch)]
        await asyncio.gather(*(self._run(chunk) for chunk in chunks))

    async def _run(self, chunk: list[tuple[T, Any]]) -> None:
        self.batches += 1
        self.items += len(chunk)
        await self._call(chunk)

    async def _call(self, chunk: list[tuple[T, Any]]) -> None:
        try:
            results = await self._fn([item for item, _ in chunk])
            if len(results) != len(chunk):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(chunk)} items")
        except BaseException as exc:  # route the failure to every waiter; none may hang
            for _, target in chunk:
                fut = target[0].fut if isinstance(target, tuple) else target
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, target), res in zip(chunk, results):
            if isinstance(target, tuple):
                target[0].put(target[1], res)
            elif not target.done():
                target.set_result(res)


class _Group:
    """The answers to one ``submit_many``: one future, set with all of them in order."""

    __slots__ = ("fut", "results", "left")

    def __init__(self, fut: asyncio.Future, n: int) -> None:
        self.fut = fut
        self.results: list[Any] = [None] * n
        self.left = n

    def put(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if not self.left and not self.fut.done():
            self.fut.set_result(self.results)


@dataclass
class RolloutStats:
    """Raw evidence of k rollouts from one prefix."""

    k: int  # decided rollouts (valid or invalid)
    c: int  # valid ones
    undecided: int  # error or timeout: never counted as wrong
    completions: list[Completion]
    verdicts: list[Verdict]

    @property
    def mc(self) -> float | None:
        return self.c / self.k if self.k else None

    def summary_verdict(self, verifier: str, version: str) -> dict[str, Any]:
        status = Status.VALID if self.c else Status.INVALID
        if self.undecided and not self.k:
            status = Status.ERROR
        detail = f"{self.c}/{self.k} rollouts correct"
        if self.undecided:
            detail += f"; {self.undecided} undecided (error/timeout)"
        return {"verifier": verifier, "version": version, "status": status.value,
                "score": self.mc, "detail": detail}


# The dependency depth of the current tree's requests: a one-element list shared by a tree's coroutine and
# every task it spawns (tasks copy the context, so they share the list). A request made at depth d raises it
# to d + 1 once its answer is in: whatever the tree asks next depends on it. Set per tree by the shard runner
# (`Engine.begin_chain`); without one, depths are not tracked. Measurement only: it never changes a request.
_CHAIN: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("stepforge_request_chain", default=None)


@dataclass
class EngineStats:
    policy_requests: int = 0
    samples: int = 0
    generated_steps: int = 0
    cache_hits: int = 0
    memo_hits: int = 0  # equal requests within one shard (e.g. a pair maker re-reading a node's rollouts)
    verifications: int = 0
    undecided_verdicts: int = 0
    timeout_verdicts: int = 0
    # Verifier calls, measurement only (rates, never data). Calls to the batch API (`verify`, one per batch the
    # scheduler hands over), the verdicts they returned and their wall time; apart from them the fast path
    # (`verify_now`, one call per item list a tree checks, in the tree's own step), whose calls of a few items
    # each would otherwise swamp the batch count and hide how well the scheduler batches.
    verify_batches: int = 0
    batched_verdicts: int = 0
    verify_seconds: float = 0.0
    verify_fast_calls: int = 0
    fast_verdicts: int = 0
    # Policy requests per dependency depth (0 = needs no earlier answer): len() is the shard's critical path
    # in requests, the least number of request latencies any scheduler needs. Only where chains are tracked.
    requests_by_depth: dict[int, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)


class _StepCounts(dict):
    """Steps per completion text, counted on first lookup: a plain dict lookup (no Python call) once known."""

    def __init__(self, fmt: Any) -> None:
        super().__init__()
        self._fmt = fmt

    def __missing__(self, text: str) -> int:
        n = self[text] = count_steps(text, self._fmt)
        return n


class Engine:
    """What an algorithm sees: sampling, rollouts and verification, batched across all trees."""

    def __init__(self, policy: Policy, verifier: Verifier, prompt: PromptConfig, *, seed: int,
                 cache: RolloutCache | None = None, temperature: float = 1.0, max_tokens: int = 1024) -> None:
        self.policy = policy
        self.verifier = verifier
        self.prompt = prompt
        self.seed = seed
        self.cache = cache
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.stats = EngineStats()
        self._gen = Batcher(self.policy.generate, policy.max_batch,
                            each=bool(getattr(policy, "independent_requests", False)))
        self._ver = Batcher(self._verify_batch, 1024)
        self._verify_now: Callable[[list[Any]], list[Verdict | None]] | None = getattr(verifier, "verify_now", None)
        # Equal requests within a shard are answered once, whether or not a persistent cache is configured,
        # so a later reader (a pair maker) never changes the data by re-sampling. Keyed like the cache.
        self._memo: dict[str, asyncio.Future[list[Completion]]] = {}
        self._memo_depth: dict[str, int] = {}  # dependency depth of the request behind each memo entry
        # A completion's segments, by (text, stop string): the pair makers and OmegaPRM's candidate search
        # re-read the rollouts a shard already segmented. Holds no more than the memo's completions do.
        self._segments: dict[tuple[str, str | None], tuple[Segment, ...]] = {}
        # Steps per completion text (`EngineStats.generated_steps`, and whether a rollout has any step): equal
        # completions of one prefix are common (a correct continuation is often the same text).
        self._step_counts = _StepCounts(self.fmt)
        # The verdicts of a request's rollouts, by its memo key with the problem and prefix text they were
        # checked for: a pair maker re-reading a node's rollouts (a memo hit) gets them again unchecked.
        self._rollout_verdicts: dict[str, tuple[Problem, str, tuple[Verdict, ...]]] = {}
        self._last_digest: tuple[str | None, str] = (None, "")

    @staticmethod
    def begin_chain(depth: int = 0) -> None:
        """Start tracking request dependency depth for the current task (one tree) at `depth`."""
        _CHAIN.set([depth])

    @property
    def fmt(self):
        return self.prompt.step_format

    def prefix_text(self, steps: Sequence[str] | Prefix) -> str:
        """The steps part of a prompt: a tree's `Prefix` as the policy wrote it, plain step texts (a
        hand-made prefix) rendered with the step format."""
        if isinstance(steps, Prefix):
            return self.fmt.prefix(steps.steps, steps.written)
        return self.fmt.render(steps)

    def render(self, problem: Problem, steps: Sequence[str] | Prefix) -> str:
        return self.prompt.render(problem.question, self.prefix_text(steps))

    def segments(self, completion: Completion) -> list[Segment]:
        """A completion's steps, each with the text the policy wrote for it; a stop string that ended the
        completion (cut from its text) was written too and ends the last step's text."""
        stopped = completion.stop_reason if completion.finish_reason == "stop" else None
        key = (completion.text, stopped if isinstance(stopped, str) else None)
        segs = self._segments.get(key)
        if segs is None:
            segs = self._segments[key] = tuple(segment(key[0], self.fmt, stopped_at=key[1]))
        return list(segs)  # a list of its own per caller (segments are frozen)

    def count_steps(self, text: str) -> int:
        """``len(self.segments(...))`` of a completion with this text, without building its segments."""
        return self._step_counts[text]

    def _prompt_sha256(self, prompt: str) -> str:
        # A request's seed and its key both hash its prompt, one right after the other: hashed once.
        last = self._last_digest
        if last[0] is prompt:
            return last[1]
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        self._last_digest = (prompt, digest)
        return digest

    def request_key(self, prompt: str, params: SamplingParams) -> str:
        """The memo and rollout-cache key of a request."""
        return cache_key(self.policy.policy_id, prompt, (*params.cache_key(), params.logprobs),
                         prompt_sha256=self._prompt_sha256(prompt))

    async def sample(self, prompt: str, params: SamplingParams, key: str | None = None) -> list[Completion]:
        key = key or self.request_key(prompt, params)
        chain = _CHAIN.get()
        memo = self._memo.get(key)
        if memo is not None:
            self.stats.memo_hits += 1
            outs = await asyncio.shield(memo)
            if chain is not None and key in self._memo_depth:
                chain[0] = max(chain[0], self._memo_depth[key] + 1)
            return outs
        fut: asyncio.Future[list[Completion]] = asyncio.get_running_loop().create_future()
        self._memo[key] = fut
        depth = chain[0] if chain is not None else None  # what this request depends on: known before it is sent
        try:
            outs, requested = await self._sample_uncached(prompt, params, key)
            if depth is not None and requested:  # a policy request, not a cache hit (which costs no latency)
                self._memo_depth[key] = depth
                self.stats.requests_by_depth[depth] = self.stats.requests_by_depth.get(depth, 0) + 1
                chain[0] = max(chain[0], depth + 1)  # type: ignore[index]
        except BaseException as exc:
            del self._memo[key]  # a failed request may be retried; waiters see the failure
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: the caller re-raises it below
            raise
        fut.set_result(outs)
        return outs

    async def _sample_uncached(self, prompt: str, params: SamplingParams, key: str) -> tuple[list[Completion], bool]:
        """(completions, whether the policy was asked: False for a cache hit)."""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit, False
        outs = await self._gen.submit(GenerationRequest(prompt, params))
        self.stats.policy_requests += 1
        self.stats.samples += len(outs)
        counts = self._step_counts
        self.stats.generated_steps += sum([counts[o.text] for o in outs])
        if self.cache is not None:
            self.cache.put(key, outs)
        return outs, True

    def params(self, *, n: int, purpose: str, prompt: str, one_step: bool = False,
               logprobs: bool = False) -> SamplingParams:
        # Seeds depend on the prompt and purpose, never on the algorithm, so rollouts are shared.
        return SamplingParams(n=n, temperature=self.temperature, max_tokens=self.max_tokens,
                              stop=self.fmt.stop if one_step else (),
                              seed=derive_seed(self.seed, purpose, self._prompt_sha256(prompt), bits=31),
                              logprobs=logprobs)

    async def _verify_batch(self, items: list[Any]) -> list[Verdict]:
        t0 = time.perf_counter()
        try:
            return await self.verifier.verify(items)
        finally:
            self.stats.verify_batches += 1
            self.stats.batched_verdicts += len(items)
            self.stats.verify_seconds += time.perf_counter() - t0

    def outcome_item(self, problem: Problem, text: str) -> Any:
        """What the outcome verifier checks for `text` written as a solution of `problem`: the text and the gold
        answer (math), or the formal statement with the steps as tactics (Lean); see `tasks/domains.py`."""
        return outcome_item(problem, text, self.fmt)

    def _count_verdicts(self, verdicts: Sequence[Verdict], statuses: list[Status] | None = None) -> None:
        """Add `verdicts` to the stats; `statuses`: theirs, where the caller has them already."""
        if statuses is None:
            statuses = [v.status for v in verdicts]
        self.stats.verifications += len(statuses)
        # Counted by status (C-level list counts), not per verdict: this runs for every answer.
        undecided = len(statuses) - statuses.count(Status.VALID) - statuses.count(Status.INVALID)
        if undecided:
            self.stats.undecided_verdicts += undecided
            self.stats.timeout_verdicts += statuses.count(Status.TIMEOUT)

    async def _verdicts(self, items: list[Any]) -> list[Verdict]:
        """The verifier's verdicts of `items` (not counted in the stats). What its fast path decides at once
        (`verify_now`: most outcome checks) needs no batch, no task and no turn of the event loop, so a tree goes
        on the moment its answer lands; the rest is batched across trees (`verify`)."""
        if self._verify_now is None:
            return await self._ver.submit_many(items)
        got = self._verify_now(items)
        missing = [i for i, v in enumerate(got) if v is None]
        self.stats.verify_fast_calls += 1  # not a batch call (`EngineStats.verify_batches`): counted apart
        self.stats.fast_verdicts += len(items) - len(missing)
        if missing:
            for i, v in zip(missing, await self._ver.submit_many([items[i] for i in missing])):
                got[i] = v
        return got  # type: ignore[return-value]

    async def verify(self, items: Sequence[Any]) -> list[Verdict]:
        verdicts = await self._verdicts(list(items))
        self._count_verdicts(verdicts)
        return list(verdicts)

    async def rollouts(self, problem: Problem, steps: Sequence[str] | Prefix, k: int,
                       purpose: str = "rollout") -> RolloutStats:
        """k completions of the prefix `steps` (one request with n = k) and their outcome verdicts.

        The seed depends on (build seed, purpose, prompt) only, never on the algorithm asking, so an MC
        estimate made by one algorithm is a cache hit for the next."""
        prefix_text = self.prefix_text(steps)
        prompt = self.prompt.render(problem.question, prefix_text)
        params = self.params(n=k, purpose=purpose, prompt=prompt)
        key = self.request_key(prompt, params)
        outs = await self.sample(prompt, params, key)
        seen = self._rollout_verdicts.get(key)
        if seen is not None and seen[0] is problem and seen[1] == prefix_text:
            verdicts = list(seen[2])  # the same items as before: outcome verdicts are functions of their item
            fresh = False
        else:
            # Equal completions are one item: a correct continuation of a prefix is often the same text.
            index: dict[str, int] = {}
            slots = [index.setdefault(o.text, len(index)) for o in outs]
            unique = await self._verdicts([self.outcome_item(problem, prefix_text + t) for t in index])
            verdicts = [unique[i] for i in slots]
            fresh = True
        statuses = [v.status for v in verdicts]
        self._count_verdicts(verdicts, statuses)
        c = statuses.count(Status.VALID)
        decided = c + statuses.count(Status.INVALID)
        if fresh and decided == len(statuses):  # undecided ones (timeouts) are asked again on a re-read
            self._rollout_verdicts[key] = (problem, prefix_text, tuple(verdicts))
        return RolloutStats(k=decided, c=c, undecided=len(verdicts) - decided, completions=outs, verdicts=verdicts)

    async def complete(self, problem: Problem, steps: Sequence[str] | Prefix, n: int,
                       purpose: str) -> list[list[Segment]]:
        """n full solutions continuing `steps`, each segmented into its new steps."""
        prompt = self.render(problem, steps)
        outs = await self.sample(prompt, self.params(n=n, purpose=purpose, prompt=prompt))
        return [self.segments(o) for o in outs]

    async def expand(self, problem: Problem, steps: Sequence[str] | Prefix, n: int) -> list[Completion]:
        """n one-step continuations of `steps` (one request, stop at the step separator), with log-probs
        where the backend gives them (priors for PUCT)."""
        prompt = self.render(problem, steps)
        return await self.sample(prompt, self.params(n=n, purpose="expand", prompt=prompt, one_step=True,
                                                     logprobs=True))


_ANSWER_RE = re.compile(r"(?i)\bthe (?:final )?answer is\b|\\boxed\{|####")


def is_final_step(step_text: str, completion: Completion | None = None) -> bool:
    """Whether a step ends its solution: it states the final answer, or generation ended on its own (EOS)
    rather than at the step separator."""
    if _ANSWER_RE.search(step_text):
        return True
    return completion is not None and completion.finish_reason == "stop" and completion.stop_reason is None
