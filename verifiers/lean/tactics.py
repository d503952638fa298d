"""Step-by-step checking in the REPL's tactic mode, with the finished proof always re-checked whole.

The statement is sent with `sorry` as its proof (`{"cmd": "<statement>\n  sorry"}`); the sorry's
`proofState` is where tactic mode starts. Each step's tactic runs on the previous step's proof state
(`{"tactic", "proofState"}`); the step is wrong when the REPL answers `{"message": "Lean error:..."}` (the
tactic threw), or its answer holds an error message or a sorry. A REPL-level error of another kind means
the step could not be judged. When every tactic ran, `goals == []` does not prove anything: before REPL
v4.19 there is no `proofStatus` at all, and even `"Completed"` is the REPL's own check of one proof
state, not Lean elaborating the declaration. So a finished run is always re-checked in command mode,
and that verdict is the proof's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

from verifiers.lean.base import LeanItem
from verifiers.lean.repl import ReplCrashed, ReplPool, ReplProtocolError
from verifiers.lean.verdict import TACTIC_ERROR_PREFIX, LeanOutcome, error_outcome, parse_command_response, timeout_outcome


@dataclass
class TacticRun:
    """`steps[i]`: True (ran cleanly), False (the first failing step), None (not run or not judged)."""

    steps: list[bool | None]
    outcome: LeanOutcome  # the whole proof's command-mode outcome, or why there is none
    proof_status: list[str | None] = field(default_factory=list)  # what the REPL said after each step

    @property
    def first_failure(self) -> int | None:
        return next((i for i, s in enumerate(self.steps) if s is False), None)


def _step_failed(answer: Any) -> bool | None:
    """True: the tactic failed; False: it ran; None: the answer is not a judgement (REPL-level error)."""
    if not isinstance(answer, dict):
        return None
    if "message" in answer and "proofState" not in answer:
        return True if str(answer["message"]).startswith(TACTIC_ERROR_PREFIX) else None
    messages = answer.get("messages") or []
    if any(isinstance(m, dict) and m.get("severity") == "error" for m in messages) or answer.get("sorries"):
        return True
    return False


async def check_tactics(pool: ReplPool, header: str, statement: str, tactics: Sequence[str]) -> TacticRun:
    """Runs `tactics` one by one under `statement` (which ends with `:= by`), then re-checks the whole
    proof in command mode if they all ran. Never raises for what the REPL does."""
    steps: list[bool | None] = [None] * len(tactics)
    statuses: list[str | None] = []
    try:
        async with pool.session(header) as s:
            start = await s.command(f"{statement}\n  sorry")
            opened = parse_command_response(start)
            if opened.error is not None or opened.errors or not opened.sorries or opened.sorries[0].proof_state is None:
                why = opened.error or (opened.errors[0].data if opened.errors else "no proof state for the sorry")
                return TacticRun(steps, error_outcome(f"the statement did not open a proof state: {why[:300]}"))
            state = opened.sorries[0].proof_state
            goals: list[str] = ["?"]
            for i, tactic in enumerate(tactics):
                if not goals:
                    steps[i] = False  # a tactic after the proof finished: "no goals to be proved"
                    break
                answer = await s.tactic(state, tactic)
                failed = _step_failed(answer)
                if failed is None:
                    return TacticRun(steps, error_outcome(f"step {i}: REPL error: {str(answer)[:300]}"), statuses)
                statuses.append(answer.get("proofStatus") if isinstance(answer, dict) else None)
                steps[i] = not failed
                if failed:
                    break
                state = answer["proofState"]
                goals = list(answer.get("goals") or [])
    except asyncio.TimeoutError:
        return TacticRun(steps, timeout_outcome(f"tactic mode timed out after {pool.timeout_s:g} s", 0.0), statuses)
    except (ReplCrashed, ReplProtocolError) as exc:
        return TacticRun(steps, error_outcome(f"tactic mode: {exc}"), statuses)
    # Whatever tactic mode said, the whole declaration's command-mode check is the proof's verdict.
    body = "\n".join([statement, *("  " + t for t in tactics)])
    return TacticRun(steps, await pool.check(LeanItem(body, header)), statuses)
