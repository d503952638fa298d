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

import asyncio
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, AsyncContextManager, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.problem import Problem
from tasks.sources.synthetic import SOURCE as SYNTHETIC
from tasks.sources.synthetic import ArithSpec, parse_question, parse_step
from verifiers.base import Status, Verdict
from verifiers.lean import LeanCodeConfig, LeanReplConfig, make_lean_verifier
from verifiers.lean.base import LeanItem
from verifiers.lean.verdict import LeanOutcome, describe, first_error

LEAN = "lean"  # the verifier name of formal verdicts in `steps.verdicts` (the consensus rules' opinion)

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
    lines.append("  " + (closing_tactic(spec, len(steps)) if complete else "sorry"))
    return FormalProof(LeanItem("\n".join(lines), HEADER, problem_id), tuple(step_lines))


def closing_tactic(spec: ArithSpec, written: int) -> str:
    """The tactic that ends a proof after `written` `have` steps: `exact hₙ` once the whole chain is stated."""
    return f"exact h{written}".translate(_SUBSCRIPTS) if written == len(spec.ops) else "sorry"


def tactic_proof(problem: Problem, tactics: Sequence[str]) -> FormalProof:
    """A proof written as tactic steps (the formal domain: `domain="lean"`): the problem's statement (ending in
    `:= by`) followed by one tactic per step, each on its own line."""
    assert problem.formal_statement is not None
    statement_text = problem.formal_statement.rstrip()
    first = statement_text.count("\n") + 2  # body line of the first tactic
    body = "\n".join([statement_text, *("  " + t.strip() for t in tactics)])
    return FormalProof(LeanItem(body, problem.header or "", problem.problem_id),
                       tuple(range(first, first + len(tactics))))


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


def formal_verdicts(outcome: LeanOutcome, step_lines: Sequence[int], *, version: str) -> list[Verdict]:
    """`steps.verdicts` evidence of one whole-proof check, one verdict per step (verifier `lean`, the name
    the consensus rules read): `valid` before the first error, `invalid` at it, `none` after it (masked);
    every step `error`/`timeout` when Lean could not judge the proof, never `invalid`. An invalid proof
    whose first error lies on no step's line (only "unsolved goals") is `error` on every step: Lean said
    no, but not where."""
    labels = formal_labels(outcome, step_lines)
    detail = describe(outcome)
    status = outcome.status
    if status is Status.INVALID and all(label is None for label in labels):
        return [Verdict(LEAN, version, Status.ERROR, None, f"invalid, no step located: {detail}") for _ in step_lines]
    if not status.decided:
        return [Verdict(LEAN, version, status, None, detail) for _ in step_lines]
    out = []
    for label in labels:
        if label is None:
            out.append(Verdict(LEAN, version, Status.NONE, None, "after Lean's first error"))
        else:
            out.append(Verdict(LEAN, version, Status.VALID if label else Status.INVALID, float(label), detail))
    return out


@dataclass(frozen=True)
class FormalCheck:
    """One solution's whole-proof check: Lean's status, and the step holding its first error (None when
    Lean located none on a step: a valid proof, an undecided one, or a sound but unfinished one)."""

    status: Status
    first_error: int | None


class FormalLabeller:
    """Formal labels of a build (the `formal` section): each solution of a problem the domain can formalise
    is checked whole by `checker` (a Lean verifier: `check(items) -> outcomes`), in one batch per problem,
    as soon as the problem's search ends. Fills `formal_label` and appends the `lean` verdicts to
    `verdicts` of the step rows; rows of problems it cannot formalise keep None and no verdict.

    `slot`, where given, is entered around every batch sent to Lean (the flow passes a Prefect global
    concurrency slot, `concurrency.lean_slots`, so builds sharing a Lean cluster stay within its size)."""

    def __init__(self, checker: Any, slot: Callable[[], AsyncContextManager[Any]] | None = None, *,
                 tactic_mode: bool = False) -> None:
        """`tactic_mode`: run each proof tactic by tactic first (REPL only: the checker's `pool`), then
        re-check it whole in command mode, whose verdict is the proof's (`verifiers/lean/tactics.py`)."""
        self.checker = checker
        self.slot = slot
        self.tactic_mode = tactic_mode
        self.version = f"{getattr(checker, 'name', 'lean')}/{getattr(checker, 'version', '?')}"
        self.counts: Counter = Counter()  # "lean/<status>" -> steps, "lean-solutions/<status>" -> proofs

    async def check(self, items: Sequence[LeanItem]) -> list[LeanOutcome]:
        if not items:
            return []
        if self.slot is None:
            return list(await self.checker.check(list(items)))
        async with self.slot():
            return list(await self.checker.check(list(items)))

    async def check_solutions(self, problem: Problem, solutions: Sequence[Sequence[str]]) -> list[LeanOutcome] | None:
        """Lean's outcome for each solution (its step texts) of `problem`, in one batch; None when the domain
        cannot formalise the problem."""
        formalise = formaliser(problem)
        if formalise is None:
            return None
        return await self.check([formalise(steps).item for steps in solutions])

    async def annotate(self, problem: Problem, rows: list[dict[str, Any]]) -> dict[str, FormalCheck]:
        """Label one problem's step rows (every solution of it) in place; returns each solution's check."""
        formalise = formaliser(problem)
        checks: dict[str, FormalCheck] = {}
        if formalise is None or not rows:
            return checks
        solutions: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            solutions.setdefault(row["solution_id"], []).append(row)
        order = sorted(solutions)  # a fixed order: the data never depends on how rows were gathered
        proofs = []
        for sid in order:
            solutions[sid].sort(key=lambda r: r["step_index"])
            proofs.append(formalise([r["step_text"] for r in solutions[sid]]))
        if self.tactic_mode:
            outcomes, tactic_firsts = await self._tactic_check(proofs)
        else:
            outcomes, tactic_firsts = await self.check([pr.item for pr in proofs]), [None] * len(proofs)
        for sid, proof, outcome, tactic_first in zip(order, proofs, outcomes, tactic_firsts):
            self.counts[f"{LEAN}-solutions/{outcome.status.value}"] += 1
            steps = solutions[sid]
            verdicts = formal_verdicts(outcome, proof.step_lines, version=self.version)
            labels = formal_labels(outcome, proof.step_lines)
            if self.tactic_mode and outcome.status.decided:
                # Evidence only: the command-mode check decides; tactic mode's first failing step (the
                # closing tactic counts as after every step) either agrees with it or is counted apart.
                said = labels.index(False) if False in labels else None
                ran = tactic_first if tactic_first is not None and tactic_first < len(steps) else None
                self.counts[f"{LEAN}-tactic/{'agree' if said == ran else 'disagree'}"] += 1
            for row, label, verdict in zip(steps, labels, verdicts):
                row["formal_label"] = label
                row["verdicts"] = [*(row.get("verdicts") or []), verdict.to_row()]
                self.counts[f"{LEAN}/{verdict.status.value}"] += 1
            checks[sid] = FormalCheck(outcome.status, labels.index(False) if False in labels else None)
        return checks

    async def _tactic_check(self, proofs: Sequence[FormalProof]) -> tuple[list[LeanOutcome], list[int | None]]:
        """Each proof through the REPL's tactic mode (statement with `sorry`, then one tactic at a time, then
        the whole declaration in command mode); (command-mode outcomes, first failing tactic or None)."""
        from verifiers.lean.tactics import check_tactics

        async def one(proof: FormalProof) -> tuple[LeanOutcome, int | None]:
            lines = proof.item.body.splitlines()
            first = proof.step_lines[0] if proof.step_lines else len(lines)  # body line of the first tactic
            run = await check_tactics(self.checker.pool, proof.item.header, "\n".join(lines[: first - 1]),
                                      [line.strip() for line in lines[first - 1:]])
            return run.outcome, run.first_failure

        async def all_() -> list[tuple[LeanOutcome, int | None]]:
            return list(await asyncio.gather(*(one(p) for p in proofs)))

        if not proofs:
            return [], []
        if self.slot is None:
            done = await all_()
        else:
            async with self.slot():
                done = await all_()
        return [o for o, _ in done], [f for _, f in done]

    async def aclose(self) -> None:
        await self.checker.aclose()


def formaliser(problem: Problem) -> Callable[[Sequence[str]], FormalProof] | None:
    """How a solution of `problem` becomes a Lean proof, or None when this domain cannot say: a Lean problem's
    steps are its tactics; a synthetic arithmetic problem is formalised by the simulated prover."""
    if problem.domain == "lean" and problem.formal_statement:
        return lambda steps: tactic_proof(problem, steps)
    parsed = parse_question(problem.question) if problem.source == SYNTHETIC else None
    if parsed is None:
        return None
    spec = parsed[0]
    return lambda steps: prove(spec, problem.problem_id, steps)


async def label_steps(rows: list[dict[str, Any]], problems: Sequence[Problem], checker: Any) -> dict[str, int]:
    """Fills `formal_label` in the step rows of every problem in `problems` that can be formalised (see
    `FormalLabeller`); returns proof verdict counts by status."""
    labeller = FormalLabeller(checker)
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_problem.setdefault(row["problem_id"], []).append(row)
    for p in sorted(problems, key=lambda p: p.problem_id):
        await labeller.annotate(p, by_problem.get(p.problem_id, []))
    prefix = f"{LEAN}-solutions/"
    return {k.removeprefix(prefix): v for k, v in labeller.counts.items() if k.startswith(prefix)}


# Fields of the Lean backends that say where and how fast Lean runs, not what it decides: left out of the
# build key, like the policy's `max_concurrency`.
LEAN_NOISE_FIELDS = ("max_repls", "max_wait_s", "max_concurrency", "max_retries", "backoff_initial_s",
                     "backoff_max_s", "breaker_threshold", "breaker_cooldown_s", "request_timeout_s", "batch_size",
                     "base_url", "api_key_env")


class FormalConfig(BaseModel):
    """Formal labels (`formal` section of a build): each solution of a problem the domain can formalise (the
    synthetic problems, through the simulated prover) is checked whole by a Lean backend; `steps.formal_label`
    and the `lean` verdicts in `steps.verdicts` come from that check."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Check every solution with Lean and fill `steps.formal_label` "
                          "(+1 before the first error, -1 at it, masked after) and the `lean` step verdicts.")
    lean: LeanCodeConfig = Field(default_factory=LeanReplConfig,  # type: ignore[valid-type]
                                 description="The Lean backend: `repl` (a pool of leanprover-community/repl "
                                 "processes) or `kimina` (a Kimina Lean Server); see the README's formal "
                                 "verification section.")

    mode: Literal["whole", "tactic"] = Field(
        "whole", description="`whole`: each proof checked whole in command mode (every backend); `tactic`: run it "
        "tactic by tactic in the REPL's tactic mode first (`lean.kind=repl` only), then re-check it whole in "
        "command mode, whose verdict decides; tactic mode's agreement is counted in the build stats.")

    @model_validator(mode="after")
    def _tactic_mode_needs_the_repl(self) -> "FormalConfig":
        from storage.errors import CrossFieldError
        from verifiers.lean import BACKENDS

        if self.mode == "tactic" and not BACKENDS[self.lean.kind].tactic_mode:
            raise CrossFieldError(f"`formal.mode=tactic` needs a backend with a tactic mode (`formal.lean.kind=repl`); "
                                  f"`{self.lean.kind}` has none: use `formal.mode=whole`.", "formal.mode",
                                  "formal.lean.kind")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_lean_tag(cls, data: Any) -> Any:
        # `--set formal.lean.timeout_s=30` means the default backend with that limit.
        if isinstance(data, dict) and isinstance(data.get("lean"), dict) and "kind" not in data["lean"]:
            data = {**data, "lean": {"kind": LeanReplConfig().kind, **data["lean"]}}
        return data


def make_formal_checker(cfg: FormalConfig | None) -> Any:
    """The Lean verifier of a build's `formal` section, or None when formal labels are off."""
    return None if cfg is None or not cfg.enabled else make_lean_verifier(cfg.lean)
