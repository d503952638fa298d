"""The formal domain of the synthetic problems: Lean 4 + Mathlib theorems, a simulated prover, formal labels.

A synthetic problem (a start quantity and a chain of operations) is the theorem that the chain's value
is the gold answer, over ℚ so that every step is exact:

    theorem synth_<id> : (((48 : ℚ) + 12) * 2) - 5 = 115 := by

The simulated prover formalises a written solution one tactic per step. Step i of the solution ("Ben
multiplies by 2: 60 * 2 = 120.") states the value the problem defines after i + 1 operations, so its
tactic is `have hᵢ : <the problem's chain up to operation i + 1> = <the value the step wrote> := by
norm_num`. Each mistake of the simulated policy (wrong result, wrong operand, wrong operation) writes a
value that is not the chain's, so its `have` is false and `norm_num` fails on that step's line; a step
that does not parse, or runs past the chain, cannot be formalised and is a `sorry`. The closing tactic
`exact hₙ` ends a complete solution (a `sorry` ends one that stopped early). The text is real Lean a user
can check with real Lean; the tests check it with the stand-in, which decides exactly this fragment.

Formal labels come from one whole-proof check: the first error by position (error messages and sorries,
ignoring "unsolved goals", see `verifiers.lean.verdict.first_error`) mapped to steps: steps before it
`True`, the step with it `False`, later steps `None` (masked). A proof that could not be judged (error,
timeout) labels nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem
from tasks.sources.synthetic import SOURCE as SYNTHETIC
from tasks.sources.synthetic import ArithSpec, parse_question, parse_step
from verifiers.base import Status
from verifiers.lean import LeanCodeConfig, LeanReplConfig, make_lean_verifier
from verifiers.lean.base import LeanItem
from verifiers.lean.verdict import LeanOutcome, first_error

HEADER = "import Mathlib"
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _lean_number(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator) if v >= 0 else f"({v.numerator})"
    return f"({v.numerator} / {v.denominator})" if v >= 0 else f"(({v.numerator}) / {v.denominator})"


def chain_expr(spec: ArithSpec, upto: int) -> str:
    """The problem's value after `upto` operations as a ℚ term, parenthesised as the chain runs."""
    expr = f"({spec.start} : ℚ)"
    for i, (op, x) in enumerate(spec.ops[:upto]):
        expr = f"{expr} {op} {x}" if i == 0 else f"({expr}) {op} {x}"
    return expr


def theorem_name(problem_id: str) -> str:
    return f"synth_{problem_id[:12]}"


def statement(spec: ArithSpec, problem_id: str) -> str:
    """The theorem line, ending in `:= by` (miniF2F's form)."""
    return f"theorem {theorem_name(problem_id)} : {chain_expr(spec, len(spec.ops))} = {spec.answer} := by"


def step_value(text: str) -> Fraction | None:
    """The value a written step states (its result), parsed like the oracle parses steps."""
    parsed = parse_step(text)
    return parsed.c if parsed is not None else None


def step_tactic(spec: ArithSpec, index: int, text: str) -> str:
    """The tactic that formalises written step `index`."""
    name = f"h{index + 1}".translate(_SUBSCRIPTS)
    value = step_value(text)
    if value is None or index >= len(spec.ops):
        return "sorry"  # not a step of this problem's chain: nothing to state
    return f"have {name} : {chain_expr(spec, index + 1)} = {_lean_number(value)} := by norm_num"


@dataclass(frozen=True)
class FormalProof:
    item: LeanItem
    step_lines: tuple[int, ...]  # body line of each step's tactic


def prove(spec: ArithSpec, problem_id: str, steps: Sequence[str]) -> FormalProof:
    """The simulated prover: one tactic per written step, then the closing tactic."""
    lines = [statement(spec, problem_id)]
    step_lines: list[int] = []
    for i, text in enumerate(steps):
        lines.append("  " + step_tactic(spec, i, text))
        step_lines.append(len(lines))
    complete = len(steps) == len(spec.ops) and steps and step_value(steps[-1]) is not None
    last = f"h{len(steps)}".translate(_SUBSCRIPTS)
    lines.append(f"  exact {last}" if complete else "  sorry")
    return FormalProof(LeanItem("\n".join(lines), HEADER, problem_id), tuple(step_lines))


def formal_labels(outcome: LeanOutcome, step_lines: Sequence[int]) -> list[bool | None]:
    """Per-step labels from one whole-proof check: before the first error True, at it False, after None."""
    n = len(step_lines)
    if outcome.status is Status.VALID:
        return [True] * n
    if outcome.status is not Status.INVALID:
        return [None] * n
    first = first_error(outcome)
    if first is None:
        return [None] * n  # invalid, but nothing locates where: label nothing rather than guess
    labels: list[bool | None] = []
    for line in step_lines:
        labels.append(True if line < first.line else False if line == first.line else None)
    return labels


async def label_steps(rows: list[dict[str, Any]], problems: Sequence[Problem], checker: Any) -> dict[str, int]:
    """Fills `formal_label` in the shard's step rows of synthetic problems: each solution is formalised by
    the simulated prover and checked whole by `checker` (a Lean verifier's `check(items) -> outcomes`).
    Rows of other problems keep None. Returns verdict counts for the build's stats."""
    specs = {}
    for p in problems:
        parsed = parse_question(p.question) if p.source == SYNTHETIC else None
        if parsed is not None:
            specs[p.problem_id] = parsed[0]
    solutions: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["problem_id"] in specs:
            solutions.setdefault(row["solution_id"], []).append(row)
    order = sorted(solutions)  # a fixed order: the data never depends on how rows were gathered
    proofs = []
    for sid in order:
        sol = sorted(solutions[sid], key=lambda r: r["step_index"])
        solutions[sid] = sol
        proofs.append(prove(specs[sol[0]["problem_id"]], sol[0]["problem_id"], [r["step_text"] for r in sol]))
    outcomes = await checker.check([pr.item for pr in proofs]) if proofs else []
    counts: dict[str, int] = {}
    for sid, proof, outcome in zip(order, proofs, outcomes):
        counts[outcome.status.value] = counts.get(outcome.status.value, 0) + 1
        for row, label in zip(solutions[sid], formal_labels(outcome, proof.step_lines)):
            row["formal_label"] = label
    return counts


class FormalConfig(BaseModel):
    """Formal labels: each solution of a synthetic problem is formalised in Lean 4 and checked whole."""

    model_config = ConfigDict(extra="forbid")

    lean: LeanCodeConfig = Field(default_factory=LeanReplConfig,
                                 description="The Lean backend (`repl` or `kimina`) that checks the proofs.")


def make_formal_checker(cfg: FormalConfig | None) -> Any:
    """The Lean verifier of a build's `formal` section, or None when formal labels are off."""
    return None if cfg is None else make_lean_verifier(cfg.lean)
