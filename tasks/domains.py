"""Problem domains by `Problem.domain`: one typed record per domain, the shape of every stepforge registry
(see `storage/exports/__init__.py`). A domain says what the outcome verifier is asked about a written
solution, so the search engine (MC rollouts, OmegaPRM, MCTS terminals) runs unchanged over any domain:

- `math`: the solution text and the gold answer (`OutcomeItem`), for answer checkers (Math-Verify);
- `lean`: the problem's formal statement followed by the solution's steps as tactics, one per line
  (`LeanItem`), for the Lean verifiers (`verifier.kind=lean`), which check each completed proof whole.

`verifiers` names the outcome verifier kinds (`verifiers/registry.py`) that take the domain's items; the build
config refuses other pairings before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from storage.errors import SourceError
from storage.render import StepFormat, segment
from tasks.formal import tactic_proof
from tasks.problem import Problem
from verifiers.base import OutcomeItem

__all__ = ["DOMAINS", "DEFAULT", "Domain", "outcome_item"]

DEFAULT = "math"


def _math_item(problem: Problem, text: str, fmt: StepFormat) -> OutcomeItem:
    return OutcomeItem(text, problem.answer or "")


def _lean_item(problem: Problem, text: str, fmt: StepFormat) -> Any:
    if not problem.formal_statement:
        # A Lean problem without a statement has nothing to prove; a math item would reach the Lean verifier,
        # which cannot check it, so say which problem and which field instead.
        raise SourceError(f"problem {problem.problem_id} ({problem.source}) is in the Lean domain but its "
                          "`formal_statement` is empty: a Lean problem needs the theorem to prove "
                          "(map a source field to `formal_statement`).", field="formal_statement",
                          value=problem.problem_id)
    return tactic_proof(problem, [s.text for s in segment(text, fmt)]).item


@dataclass(frozen=True)
class Domain:
    """`outcome_item(problem, solution text, step format)` is what the outcome verifier checks."""

    name: str
    outcome_item: Callable[[Problem, str, StepFormat], Any]
    verifiers: tuple[str, ...]


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("math", _math_item, verifiers=("outcome",)),
        Domain("lean", _lean_item, verifiers=("lean",)),
    )
}


def outcome_item(problem: Problem, text: str, fmt: StepFormat) -> Any:
    """The outcome verifier's item for `text` written as a solution of `problem` (unknown domains: math)."""
    return DOMAINS.get(problem.domain, DOMAINS[DEFAULT]).outcome_item(problem, text, fmt)
