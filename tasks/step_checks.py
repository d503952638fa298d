"""Step-level verdicts for a problem's solution paths: every step check (arithmetic, code) and the LLM judge.

Each step row gets `verdicts`, one entry per step verifier that ran (raw evidence, never one merged bool),
and `judge_label` (+1 before the judge's first error, -1 at it, null after it or when the judge was
undecided). Rules that combine them (consensus) are applied where labels are made, not here.

All of a problem's distinct step texts go to each check in one batch, and all of its solutions to the judge
in one batch (one request per solution with `n = votes`); the shard runs this per problem as soon as the
problem's search ends, so judge requests overlap the other problems' search instead of waiting for the
whole shard. A judge backend that fails raises (`JudgeBackendError`), which fails the shard: a rerun
resumes from the finished shards.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from tasks.policy.base import GenerationRequest, SamplingParams
from verifiers.base import SolutionItem, StepItem, Verdict, Verifier
from verifiers.judge import judge_labels, step_verdicts


def judge_request(prompt: str, n: int, temperature: float, max_tokens: int, seed: int) -> GenerationRequest:
    """The `request_factory` a `JudgeVerifier` is built with: the policy protocol's request type."""
    return GenerationRequest(prompt, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed))


@dataclass
class StepVerifiers:
    """The step verifiers of a build: `checks` judge one step at a time (`StepItem`), `judge` whole
    solutions (`SolutionItem`, one verdict per solution, spread over its steps)."""

    checks: Sequence[Verifier] = ()
    judge: Verifier | None = None
    counts: Counter = field(default_factory=Counter)  # "<verifier>/<status>" -> steps

    @property
    def enabled(self) -> bool:
        return bool(self.checks) or self.judge is not None

    async def annotate(self, question: str, rows: list[dict[str, Any]]) -> None:
        """Fill `verdicts` and `judge_label` of one problem's step rows (every solution of it) in place."""
        for row in rows:
            row["verdicts"] = []
        if not rows or not self.enabled:
            return
        solutions: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            solutions.setdefault(row["solution_id"], []).append(row)
        for steps in solutions.values():
            steps.sort(key=lambda r: r["step_index"])
        texts = sorted({row["step_text"] for row in rows})  # sorted: batches never depend on dict order
        ids = sorted(solutions)
        items = [SolutionItem(question, tuple(r["step_text"] for r in solutions[sid])) for sid in ids]

        async def run_check(check: Verifier) -> dict[str, Verdict]:
            verdicts = await check.verify([StepItem(t) for t in texts])
            return dict(zip(texts, verdicts))

        async def run_judge() -> dict[str, Verdict]:
            if self.judge is None:
                return {}
            # A failing backend raises JudgeBackendError (a PolicyError): the shard fails, saying how to resume.
            return dict(zip(ids, await self.judge.verify(items)))

        *by_text, by_solution = await asyncio.gather(*(run_check(c) for c in self.checks), run_judge())
        for sid, steps in solutions.items():
            judged = by_solution.get(sid)
            spread = step_verdicts(judged, len(steps)) if judged is not None else None
            labels = judge_labels(judged, len(steps)) if judged is not None else None
            for i, row in enumerate(steps):
                verdicts = [table[row["step_text"]] for table in by_text]
                if spread is not None:
                    verdicts.append(spread[i])
                    row["judge_label"] = labels[i]
                row["verdicts"] = [v.to_row() for v in verdicts]
                for v in verdicts:
                    self.counts[f"{v.verifier}/{v.status.value}"] += 1
        if self.judge is not None:
            for sid in ids:
                self.counts[f"judge-solutions/{by_solution[sid].status.value}"] += 1

    async def aclose(self) -> None:
        for v in (*self.checks, *([self.judge] if self.judge is not None else [])):
            await v.aclose()
