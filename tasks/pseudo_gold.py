"""Majority-vote pseudo-gold for problems without a gold answer (`source.fields.answer: null`).

Before such a problem is searched, the policy samples `samples` full solutions from the bare question; the
final answer most of them reach (compared as exact numbers where they are numbers, as text otherwise)
becomes the outcome verifier's reference, as self-consistency does. The problem keeps it as its `answer`
and records `metadata["pseudo_gold"]` (the answer, its vote share, the votes and the samples), so every
release says which references were voted and by how much. A problem whose top answer has less than
`min_share` of the votes (or a tie) gets no reference and is not searched: its labels would be noise.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem
from verifiers.outcome import as_number, extract_answer


class PseudoGoldConfig(BaseModel):
    """How problems without a gold answer get a reference."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Vote a reference for problems without a gold answer (only those). Off: they are "
        "searched with no reference, so every rollout counts as wrong.")
    samples: int = Field(16, ge=1, description="M: solutions sampled from the bare question (one request, n = M).")
    min_share: float = Field(
        0.25, gt=0.0, le=1.0, description="The top answer's minimum share of the M votes (answers that could "
        "not be extracted count as votes for nothing); below it, or on a tie, the problem is skipped.")


@dataclass(frozen=True)
class PseudoGold:
    """The vote on one problem: the winning answer (None: no reference), its share of all samples, the counts."""

    answer: str | None
    share: float
    votes: int
    samples: int
    counts: dict[str, int]

    def as_metadata(self) -> dict[str, Any]:
        return {"answer": self.answer, "share": round(self.share, 6), "votes": self.votes, "samples": self.samples}


def canonical_answer(text: str) -> str | None:
    """The final answer of a solution text in a form equal answers share: an exact number as ``n`` or ``p/q``
    (``18``, ``18.0`` and ``$18`` are one vote), anything else as its stripped text; None if there is none."""
    raw = extract_answer(text)
    if raw is None or not raw.strip():
        return None
    number = as_number(raw)
    if number is None:
        return raw.strip().strip("$ .")
    frac = Fraction(number)
    return str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"


def vote(texts: Sequence[str], min_share: float) -> PseudoGold:
    """The majority answer of solution texts (pure)."""
    counts = Counter(a for a in (canonical_answer(t) for t in texts) if a is not None)
    n = len(texts)
    if not counts:
        return PseudoGold(None, 0.0, 0, n, {})
    ranked = counts.most_common()
    top, votes = ranked[0]
    share = votes / n if n else 0.0
    tied = len(ranked) > 1 and ranked[1][1] == votes
    winner = None if tied or share < min_share else top
    return PseudoGold(winner, share, votes, n, dict(sorted(counts.items())))


async def pseudo_gold(engine: Any, problem: Problem, cfg: PseudoGoldConfig) -> PseudoGold:
    """Sample M solutions of `problem` through the search engine (purpose `pseudo-gold`: its own seeds, and
    rollout-cache entries shared by every algorithm) and vote."""
    solutions = await engine.complete(problem, [], cfg.samples, purpose="pseudo-gold")
    # The steps as the policy wrote them, put back together: the final answer is in the text, wherever.
    return vote(["".join(seg.generated or seg.text + "\n" for seg in steps) for steps in solutions], cfg.min_share)


def with_reference(problem: Problem, vote_result: PseudoGold) -> Problem:
    """The problem with the voted answer as its reference and the vote in `metadata["pseudo_gold"]`."""
    return dataclasses.replace(problem, answer=vote_result.answer,
                               metadata={**problem.metadata, "pseudo_gold": vote_result.as_metadata()})
