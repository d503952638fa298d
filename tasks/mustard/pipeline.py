"""The MUSTARD-style loop, as plain async code (the flow in `flows/mustard.py` wraps it per shard).

For every seed (a concept and a sample index) the author model writes a problem, an informal proof and a
Lean 4 proof (`mustard-author.jinja`); Lean checks the proof; a rejected proof goes back to the author with
Lean's messages (`mustard-revise.jinja`) up to `max_revisions` times. All seeds of a round go to the author
as one batch and their proofs to Lean as one batch, so a shard costs R + 1 round trips, not one per seed.

How each attempt ends, and what follows:

- `valid` (no error, no sorry): the seed passes, with every attempt's verdict and the revisions it took;
- `invalid` (Lean rejected it): revised while revisions are left, else the seed fails as `invalid`;
- `timeout` / `error` (the check did not finish: a hang, a crash, a protocol or transport error, an
  overloaded pool, a proof outside the stand-in's fragment): the seed fails as such at once. Lean said
  nothing about the proof, so there is nothing to revise and it is never called `invalid`;
- `malformed` (the answer lacks a section or the Lean block): the seed fails; nothing reached Lean.

Every failure is counted for the manifest; the first `FAILURES_KEPT` in seed order are listed (seed, status,
revisions, detail). Request seeds
derive from (build seed, seed id, revision), so the same config gives the same texts whatever the order
answers arrive in.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Callable, Sequence

from storage.render import compile_template
from storage.schema import content_id, problem_id
from tasks.mustard.concepts import Seed
from tasks.mustard.texts import Answer, LeanFile, MalformedAnswer, feedback, lean_file, parse_answer, render_answer
from tasks.policy.base import GenerationRequest, SamplingParams, derive_seed
from verifiers.base import Status, Verdict
from verifiers.lean.verdict import lean_verdict

SOURCE = "mustard"
FORMAT_VERIFIER = "mustard-format"  # the verdict of an answer that never reached Lean
FAILURES_KEPT = 1000  # failure records listed in a manifest (all are counted)


@dataclass(frozen=True)
class LoopSettings:
    max_revisions: int
    temperature: float
    max_tokens: int
    default_header: str
    seed: int  # the build seed
    author_template: str  # Jinja text
    revise_template: str


@dataclass
class Attempt:
    text: str  # the author's answer as written
    status: str  # valid | invalid | timeout | error | malformed
    verdict: dict[str, Any]  # the `verdicts` struct row
    answer: Answer | None = None
    lean: LeanFile | None = None
    feedback: str = ""  # Lean's messages shown to the author (rejected attempts only)


@dataclass
class SeedResult:
    seed: Seed
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def status(self) -> str:
        """`passed`, or why the seed failed: `invalid` (out of revisions), `timeout`, `error`, `malformed`."""
        last = self.attempts[-1].status
        return "passed" if last == Status.VALID.value else last

    @property
    def revisions(self) -> int:
        return len(self.attempts) - 1


class Prompts:
    """The two templates, rendered sandboxed (their text may come from a user's file)."""

    def __init__(self, author: str, revise: str) -> None:
        self._author = compile_template(author)
        self._revise = compile_template(revise)

    def first(self, seed: Seed) -> str:
        return self._author.render(concept=seed.concept.concept, level=seed.concept.level)

    def revision(self, seed: Seed, last: Attempt) -> str:
        assert last.answer is not None
        return self._revise.render(concept=seed.concept.concept, level=seed.concept.level,
                                   previous=render_answer(last.answer), feedback=last.feedback)


async def _generate(author: Any, requests: list[GenerationRequest]) -> list[str]:
    if getattr(author, "independent_requests", False):  # an HTTP server: each request on its own
        results = await asyncio.gather(*(author.generate([r]) for r in requests))
        outs = [r[0] for r in results]
    else:
        size = max(1, int(getattr(author, "max_batch", len(requests) or 1)))
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        outs = [o for part in await asyncio.gather(*(author.generate(c) for c in chunks)) for o in part]
    return [o[0].text if o else "" for o in outs]


async def _check(checker: Any, items: list[Any], slot: Callable[[], AsyncContextManager[Any]] | None) -> list[Any]:
    if not items:
        return []
    if slot is None:
        return list(await checker.check(items))
    async with slot():
        return list(await checker.check(items))


def _format_verdict(detail: str) -> dict[str, Any]:
    return Verdict(FORMAT_VERIFIER, "1", Status.ERROR, None, detail).to_row()


async def run_mustard(seeds: Sequence[Seed], author: Any, checker: Any, settings: LoopSettings, *,
                      on_done: Callable[[int], None] | None = None,
                      slot: Callable[[], AsyncContextManager[Any]] | None = None) -> list[SeedResult]:
    """Generates, checks and revises every seed; one `SeedResult` per seed, in the order given.

    `author`: a policy backend (`generate(requests)`); `checker`: a Lean verifier (`check(items)` ->
    `LeanOutcome`s, `name`, `version`). `on_done(n)` is called as seeds finish (progress). `slot`, where
    given, is entered around every batch sent to Lean (the flow passes a Prefect global concurrency slot,
    `concurrency.lean_slots`, so runs sharing a Lean cluster stay within its size)."""
    prompts = Prompts(settings.author_template, settings.revise_template)
    results = [SeedResult(s) for s in seeds]
    active = list(results)
    for rev in range(settings.max_revisions + 1):
        if not active:
            break
        requests = [GenerationRequest(
            prompts.first(r.seed) if rev == 0 else prompts.revision(r.seed, r.attempts[-1]),
            SamplingParams(n=1, temperature=settings.temperature, max_tokens=settings.max_tokens,
                           seed=derive_seed(settings.seed, SOURCE, r.seed.seed_id, rev)))
            for r in active]
        texts = await _generate(author, requests)
        if len(texts) != len(active):
            # zip would drop the seeds past the shorter list without a trace: name the first one left out.
            missing = active[len(texts)].seed.seed_id if len(texts) < len(active) else None
            raise RuntimeError(
                f"the author returned {len(texts)} answers for {len(active)} requests in round {rev}"
                + (f"; no answer for seed {missing!r}" if missing else "; more answers than requests")
                + ": a policy backend must answer every request, in order")
        checking: list[tuple[SeedResult, Attempt]] = []
        for r, text in zip(active, texts):
            try:
                answer = parse_answer(text)
            except MalformedAnswer as exc:
                r.attempts.append(Attempt(text, "malformed", _format_verdict(f"malformed answer: {exc}")))
                continue
            attempt = Attempt(text, "", {}, answer, lean_file(answer.formal, settings.default_header, r.seed.seed_id))
            r.attempts.append(attempt)
            checking.append((r, attempt))
        outcomes = await _check(checker, [a.lean.item for _, a in checking], slot)  # type: ignore[union-attr]
        if len(outcomes) != len(checking):
            missing = checking[len(outcomes)][0].seed.seed_id if len(outcomes) < len(checking) else None
            raise RuntimeError(
                f"the Lean checker returned {len(outcomes)} verdicts for {len(checking)} proofs in round {rev}"
                + (f"; none for seed {missing!r}" if missing else "; more verdicts than proofs"))
        for (r, attempt), outcome in zip(checking, outcomes):
            attempt.status = outcome.status.value
            attempt.verdict = lean_verdict(outcome, verifier=checker.name, version=checker.version).to_row()
            if outcome.status is Status.INVALID:
                attempt.feedback = feedback(outcome, attempt.lean.offset)  # type: ignore[union-attr]
        still = [r for r in active if r.attempts[-1].status == Status.INVALID.value and rev < settings.max_revisions]
        if on_done is not None and len(active) > len(still):
            on_done(len(active) - len(still))
        active = still
    return results


def record_id(result: SeedResult) -> str:
    last = result.attempts[-1]
    assert last.answer is not None
    return content_id("mustard", result.seed.concept.id, last.answer.problem, last.answer.formal)


def rows(results: Sequence[SeedResult], author_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(`problems` rows, `mustard` rows) of the seeds that passed."""
    problems, records = [], []
    for r in results:
        if r.status != "passed":
            continue
        last = r.attempts[-1]
        assert last.answer is not None and last.lean is not None
        c = r.seed.concept
        pid = problem_id(SOURCE, last.answer.problem)
        rid = record_id(r)
        problems.append({"problem_id": pid, "source": SOURCE, "domain": "lean", "question": last.answer.problem,
                         "answer": None, "header": last.lean.item.header, "formal_statement": last.lean.statement,
                         "metadata": json.dumps({"concept_id": c.id, "concept": c.concept, "level": c.level,
                                                 "seed_id": r.seed.seed_id, "record_id": rid},
                                                sort_keys=True, ensure_ascii=False)})
        records.append({
            "record_id": rid, "seed_id": r.seed.seed_id, "problem_id": pid, "concept_id": c.id,
            "concept": c.concept, "level": c.level, "problem": last.answer.problem,
            "informal_proof": last.answer.informal, "formal_proof": last.answer.formal,
            "header": last.lean.item.header, "formal_statement": last.lean.statement, "revisions": r.revisions,
            "verdicts": [a.verdict for a in r.attempts],
            "attempts": [a.answer.formal if a.answer is not None else a.text for a in r.attempts],
            "feedback": [a.feedback for a in r.attempts[:-1]], "author": author_id,
        })
    return problems, records


def failure(r: SeedResult) -> dict[str, Any]:
    return {"seed_id": r.seed.seed_id, "concept_id": r.seed.concept.id, "level": r.seed.concept.level,
            "status": r.status, "revisions": r.revisions, "detail": r.attempts[-1].verdict.get("detail", "")}


def stats(results: Sequence[SeedResult]) -> dict[str, Any]:
    """Counts of one shard (merge shards with `merge_stats`): seeds, passes, failures by reason, passes by
    revisions, author requests, Lean checks and verdicts, per level, and the failure records."""
    attempts = [a for r in results for a in r.attempts]
    by_level: dict[str, dict[str, int]] = {}
    for r in results:
        lv = by_level.setdefault(r.seed.concept.level, {"seeds": 0, "passed": 0})
        lv["seeds"] += 1
        lv["passed"] += r.status == "passed"
    return {
        "seeds": len(results),
        "passed": sum(r.status == "passed" for r in results),
        "failed": dict(Counter(r.status for r in results if r.status != "passed")),
        "passed_after_revisions": {str(k): v for k, v in
                                   Counter(r.revisions for r in results if r.status == "passed").items()},
        "author_requests": len(attempts),
        "lean_checks": sum(a.status != "malformed" for a in attempts),
        "lean_verdicts": dict(Counter(a.status for a in attempts if a.status != "malformed")),
        "by_level": by_level,
        "failures": [failure(r) for r in results if r.status != "passed"],
    }


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shard stats added up; failure records in seed order, the first `FAILURES_KEPT` kept."""
    out: dict[str, Any] = {"seeds": 0, "passed": 0, "failed": Counter(), "passed_after_revisions": Counter(),
                           "author_requests": 0, "lean_checks": 0, "lean_verdicts": Counter(), "by_level": {},
                           "failures": []}
    for p in parts:
        for key in ("seeds", "passed", "author_requests", "lean_checks"):
            out[key] += p[key]
        for key in ("failed", "passed_after_revisions", "lean_verdicts"):
            out[key].update(p[key])
        for level, counts in p["by_level"].items():
            lv = out["by_level"].setdefault(level, {"seeds": 0, "passed": 0})
            lv["seeds"] += counts["seeds"]
            lv["passed"] += counts["passed"]
        out["failures"] += p["failures"]
    total_failures = len(out["failures"])
    out["failures"] = sorted(out["failures"], key=lambda f: f["seed_id"])[:FAILURES_KEPT]
    out["failures_listed"] = len(out["failures"])
    out["failures_total"] = total_failures
    for key in ("failed", "passed_after_revisions", "lean_verdicts"):
        out[key] = dict(sorted(out[key].items()))
    out["by_level"] = dict(sorted(out["by_level"].items()))
    out["pass_rate"] = round(out["passed"] / out["seeds"], 4) if out["seeds"] else None
    return out
