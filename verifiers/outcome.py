"""Outcome verifier: is a completion's final answer the gold answer?

Two steps, like Math-Verify's own `parse`/`verify`: extract the final answer from free text, then
compare. Numbers (integers, decimals, fractions, with `$`, `,` and `%` noise) are compared exactly in
this process; anything else (LaTeX, expressions, sets) goes to Math-Verify in a process pool. Math-Verify
times itself out with `signal.alarm`, which only works in a process's main thread, so it must never run
in the flow's worker threads; the pool also gives a hard per-item timeout that kills a stuck worker.

A verdict that could not be reached is `error` or `timeout`, never `invalid`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import re
from functools import lru_cache
from fractions import Fraction
from importlib import metadata
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from verifiers.base import OutcomeItem, Status, Verdict

NAME = "outcome"

# Most specific first: an explicit answer statement beats "the last number in the text". Each pattern with a
# literal every match contains: where the literal is absent the pattern cannot match, and a substring test is
# far cheaper than a regex scan of the whole solution (answers are extracted from every rollout).
_ANSWER_PATTERNS = [
    ("\\boxed{", re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")),
    ("####", re.compile(r"####\s*([^\n]+)")),
    ("answer is", re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?([^\n]+?)\$?\s*(?:\.\s*)?$", re.MULTILINE)),
    ("A:", re.compile(r"^A:\s*([^\n]+)$", re.MULTILINE)),
]
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_NUMERIC_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text` (last match of the most specific pattern), or its last number."""
    for literal, pattern in _ANSWER_PATTERNS:
        if literal not in text:
            continue
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    """`text` as an exact number if it is one once currency, separators, units of % and a trailing
    period are dropped; None otherwise."""
    t = text.strip().rstrip(".").strip()
    t = t.replace("$", "").replace(",", "").replace("\\%", "").replace("%", "").strip()
    t = re.sub(r"^\\?\(|\\?\)$", "", t).strip()
    if not _NUMERIC_RE.fullmatch(t):
        # "18 dollars", "x = 18": a single number among words still counts as that number.
        numbers = _NUMBER_RE.findall(t)
        if len(numbers) != 1 or re.search(r"[\\{}=+*/^]|\d\s*-", t):
            return None
        t = numbers[0].replace(",", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


@lru_cache(maxsize=1 << 16)
def check(answer: str, gold: str) -> bool | None:
    """The fast path: True/False when both sides are numbers or equal strings, None when undecided.
    Cached: a pure function of two strings, and the k rollouts of a prefix share one gold answer and mostly a
    handful of answers (it was the engine's largest CPU cost per rollout: two `Fraction` parses each)."""
    a, g = as_number(answer), as_number(gold)
    if a is not None and g is not None:
        return a == g
    if answer.strip().strip("$ .") == gold.strip().strip("$ ."):
        return True
    return None


def _parse(text: str, seconds: int) -> list:
    from math_verify import parse

    # Math-Verify looks for LaTeX inside delimiters; a bare extracted answer gets them added.
    return parse(f"${text}$", parsing_timeout=seconds) or parse(text, parsing_timeout=seconds)


def _math_verify(answer: str, gold: str, timeout_s: float) -> bool:
    """Runs in a pool worker's main thread, where Math-Verify's `signal.alarm` timeouts work."""
    from math_verify import verify

    seconds = max(1, int(timeout_s))
    gold_parsed = _parse(gold, seconds)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} cannot be parsed")
    answer_parsed = _parse(answer, seconds)
    if not answer_parsed:
        raise ValueError(f"answer {answer!r} cannot be parsed")
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=seconds))


def _warm_up() -> None:
    # Imported before the first item, so a worker's start-up never eats into an item's timeout.
    import math_verify  # noqa: F401


_FAST_CACHE = 1 << 16  # (answer, gold) pairs whose fast-path verdict a verifier keeps


class OutcomeVerifierConfig(BaseModel):
    """How final answers are checked."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["outcome"] = "outcome"
    timeout_s: float = Field(5.0, gt=0, description="Hard limit per item in the Math-Verify pool.")
    workers: int = Field(2, ge=1, le=64, description="Math-Verify worker processes (started on first use).")
    use_math_verify: bool = Field(True, description="Send answers the numeric fast path cannot decide to "
                                  "Math-Verify; off: they are `error`.")


class OutcomeVerifier:
    """`Verifier` for final answers against gold; batched and async, CPU work in a process pool."""

    name = NAME

    def __init__(self, config: OutcomeVerifierConfig | None = None,
                 slow_check: Callable[[str, str, float], bool] = _math_verify) -> None:
        """`slow_check` runs in the pool for answers the fast path cannot decide; it must be a picklable
        module-level function (tests swap in a deliberately slow one)."""
        self.config = config or OutcomeVerifierConfig()
        self._slow_check = slow_check
        self.version = f"fastpath-1+math-verify-{metadata.version('math-verify')}"
        self._pool = None
        # Fast-path verdicts by (answer, gold): a prefix's k rollouts share the gold answer and mostly a few
        # answers, and a verdict is immutable, so equal ones are one object (building it was a tenth of the
        # engine's CPU per rollout). None: the fast path cannot decide. Bounded: cleared when full.
        self._fast: dict[tuple[str, str], Verdict | None] = {}

    def _get_pool(self):
        if self._pool is None:
            from pebble import ProcessPool

            # forkserver: the flow runs tasks in threads, and forking a threaded process can deadlock.
            self._pool = ProcessPool(max_workers=self.config.workers, initializer=_warm_up,
                                     context=multiprocessing.get_context("forkserver"))
        return self._pool

    def _verdict(self, status: Status, detail: str, score: float | None = None, answer: str | None = None) -> Verdict:
        return Verdict(self.name, self.version, status, score, detail, answer)

    def _fast_verdict(self, answer: str, gold: str) -> Verdict | None:
        key = (answer, gold)
        try:
            return self._fast[key]
        except KeyError:
            pass
        if len(self._fast) >= _FAST_CACHE:
            self._fast.clear()
        fast = check(answer, gold)
        verdict = self._fast[key] = None if fast is None else self._verdict(
            Status.VALID if fast else Status.INVALID, f"answer={answer}", float(fast), answer)
        return verdict

    def _now(self, item: OutcomeItem) -> Verdict | tuple[str, str]:
        """The item's verdict without Math-Verify, or (answer, gold) for the pool."""
        gold = (item.gold or "").strip()
        answer = extract_answer(item.completion)
        if not gold:
            return self._verdict(Status.ERROR, "no gold answer to compare with", answer=answer)
        if answer is None:
            return self._verdict(Status.INVALID, "no final answer in the completion", 0.0)
        fast = self._fast_verdict(answer, gold)
        if fast is not None:
            return fast
        if not self.config.use_math_verify:
            return self._verdict(Status.ERROR, f"answer={answer}: not numeric, Math-Verify off", answer=answer)
        return answer, gold

    def verify_now(self, batch: Sequence[OutcomeItem]) -> list[Verdict | None]:
        """The fast path alone, in this thread: None for the items Math-Verify has to decide (`verify`). The
        engine calls this first, so most rollouts are checked without a batch or a task."""
        return [v if isinstance(v, Verdict) else None for v in map(self._now, batch)]

    async def verify(self, batch: Sequence[OutcomeItem]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(batch)
        slow: list[tuple[int, str, str]] = []
        for i, item in enumerate(batch):
            v = self._now(item)
            if isinstance(v, Verdict):
                verdicts[i] = v
            else:
                slow.append((i, *v))
        if slow:
            pool = self._get_pool()
            futures = [pool.schedule(self._slow_check, args=(a, g, self.config.timeout_s),
                                     timeout=self.config.timeout_s) for _, a, g in slow]
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
            for (i, answer, _), res in zip(slow, results):
                if isinstance(res, (TimeoutError, concurrent.futures.TimeoutError)):
                    verdicts[i] = self._verdict(Status.TIMEOUT, f"answer={answer}: over {self.config.timeout_s}s",
                                                answer=answer)
                elif isinstance(res, BaseException):
                    verdicts[i] = self._verdict(Status.ERROR, f"answer={answer}: {type(res).__name__}: {res}",
                                                answer=answer)
                else:
                    verdicts[i] = self._verdict(Status.VALID if res else Status.INVALID, f"answer={answer}",
                                                float(res), answer)
        return [v for v in verdicts if v is not None]

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=5)
            self._pool = None
