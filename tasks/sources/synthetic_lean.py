"""`source.kind=synthetic-lean`: the synthetic arithmetic problems as Lean 4 + Mathlib theorems, the formal
domain's problems for search (Math-Shepherd MC, OmegaPRM, MCTS over tactic steps).

Each synthetic problem becomes a problem of `domain="lean"` whose question is its theorem (as miniF2F's
questions are their statements, ending in `:= by`), with `header` and `formal_statement` filled, the gold
value as `answer` (for reading, Lean does not need it), and in `metadata` the informal question and the
reference proof's tactics. A written proof is the statement followed by its tactic steps; `verifier.kind=lean`
checks it whole; `policy.kind=simulated-prover` writes such proofs with the simulated policy's mistakes.
"""

from __future__ import annotations

from typing import Literal

from tasks.formal import HEADER, prove, statement
from tasks.problem import Problem
from tasks.sources.base import SourceResult
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic, parse_question

SOURCE = "synthetic-lean"


class SyntheticLeanSourceConfig(SyntheticSourceConfig):
    """The synthetic arithmetic problems as Lean 4 theorems (the formal domain); same generator and fields
    as `synthetic`, so `seed` gives the same problems in both domains."""

    kind: Literal["synthetic-lean"] = "synthetic-lean"  # type: ignore[assignment]


def formal_problem(informal: Problem) -> Problem:
    """The Lean 4 problem of one synthetic problem."""
    spec, _ = parse_question(informal.question)  # type: ignore[misc]  # the generator's own text always parses
    theorem = statement(spec, informal.problem_id)
    reference = prove(spec, informal.problem_id, informal.metadata["reference_steps"])
    tactics = [line.strip() for line in reference.item.body.splitlines()[1:]]
    return Problem(source=SOURCE, question=theorem, answer=str(spec.answer), domain="lean", header=HEADER,
                   formal_statement=theorem,
                   metadata={"informal": informal.question, "informal_id": informal.problem_id,
                             "n_steps": informal.metadata["n_steps"], "difficulty": informal.metadata["difficulty"],
                             "reference_steps": tactics})


def load_synthetic_lean(cfg: SyntheticLeanSourceConfig) -> SourceResult:
    informal = load_synthetic(SyntheticSourceConfig(**cfg.model_dump(exclude={"kind"})))
    return SourceResult(problems=[formal_problem(p) for p in informal.problems], quarantined=[],
                        duplicates=informal.duplicates)
