"""What a Lean answer means: the one place where a checked proof becomes a verdict.

Every Lean backend (the REPL pool, the Kimina client, LeanDojo) turns its transport's answer into a
`LeanOutcome` and calls `lean_verdict`; none of them decides validity itself. The rules:

- **valid** only when Lean answered, with no message of severity `error`, no entry in `sorries`, no
  "declaration uses sorry" warning (quoted `'sorry'` up to Lean v4.27, `` `sorry` `` from v4.28: both are
  recognised), and no timeout or transport error;
- **invalid** when Lean answered with an error message, a sorry or a sorry warning;
- **timeout** when the wall-clock limit ran out (the REPL has no timeout of its own);
- **error** when nothing trustworthy came back: a crash, a broken or unparseable response, a REPL-level
  error object (`{"message": ...}`: unknown environment, a stand-in's "outside the fragment"), an
  overloaded pool, a failed header. Never `invalid`: the proof was not judged.

`first_error` locates the first problem in a proof the way DeepSeek-Prover's truncate-and-resume does:
the minimum position over error messages and sorries, ignoring "unsolved goals" (reported at the `by`
that opens the block, it says the proof is unfinished, not where it went wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from verifiers.base import Status, Verdict

# Both spellings of the warning Lean attaches to a declaration that uses `sorry`.
SORRY_WARNINGS = ("declaration uses 'sorry'", "declaration uses `sorry`")
UNSOLVED_GOALS = "unsolved goals"
# The REPL's prefix for a tactic that threw in tactic mode (`{"message": "Lean error:\n..."}`): the
# tactic failed, which is a judgement on the tactic, unlike the other REPL-level errors.
TACTIC_ERROR_PREFIX = "Lean error:"


@dataclass(frozen=True, order=True)
class Pos:
    line: int  # 1-based, as Lean reports it
    column: int  # 0-based, in code points

    @classmethod
    def of(cls, raw: Any) -> "Pos | None":
        if not isinstance(raw, Mapping):
            return None
        try:
            return cls(int(raw["line"]), int(raw["column"]))
        except (KeyError, TypeError, ValueError):
            return None

    def shifted(self, lines: int) -> "Pos":
        return Pos(self.line + lines, self.column)


@dataclass(frozen=True)
class LeanMessage:
    severity: str  # trace | info | warning | error
    pos: Pos
    end_pos: Pos | None
    data: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    @property
    def is_sorry_warning(self) -> bool:
        return self.severity == "warning" and any(w in self.data for w in SORRY_WARNINGS)


@dataclass(frozen=True)
class LeanSorry:
    pos: Pos | None  # the REPL leaves positions out when it has none
    end_pos: Pos | None
    goal: str
    proof_state: int | None


@dataclass(frozen=True)
class LeanOutcome:
    """One Lean answer for one proof, whatever carried it. Positions are relative to the proof body
    (line 1 = the first line after the header), whichever backend produced them."""

    messages: tuple[LeanMessage, ...] = ()
    sorries: tuple[LeanSorry, ...] = ()
    env: int | None = None
    error: str | None = None  # crash, protocol or REPL-level error: the proof was not judged
    timed_out: bool = False
    time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def answered(self) -> bool:
        return self.error is None and not self.timed_out

    @property
    def errors(self) -> list[LeanMessage]:
        return [m for m in self.messages if m.is_error]

    @property
    def has_sorry(self) -> bool:
        return bool(self.sorries) or any(m.is_sorry_warning for m in self.messages)

    @property
    def status(self) -> Status:
        if self.timed_out:
            return Status.TIMEOUT
        if self.error is not None:
            return Status.ERROR
        if self.errors or self.has_sorry:
            return Status.INVALID
        return Status.VALID

    def shifted(self, lines: int) -> "LeanOutcome":
        """The same outcome with every position moved by `lines` (header offsets)."""
        if not lines:
            return self
        msgs = tuple(LeanMessage(m.severity, m.pos.shifted(lines), m.end_pos.shifted(lines) if m.end_pos else None,
                                 m.data) for m in self.messages)
        sorries = tuple(LeanSorry(s.pos.shifted(lines) if s.pos else None,
                                  s.end_pos.shifted(lines) if s.end_pos else None, s.goal, s.proof_state)
                        for s in self.sorries)
        return LeanOutcome(msgs, sorries, self.env, self.error, self.timed_out, self.time_s, self.extra)


def timeout_outcome(detail: str, time_s: float) -> LeanOutcome:
    return LeanOutcome(error=detail, timed_out=True, time_s=time_s)


def error_outcome(detail: str, time_s: float = 0.0) -> LeanOutcome:
    return LeanOutcome(error=detail, time_s=time_s)


def _message(raw: Any) -> LeanMessage | None:
    if not isinstance(raw, Mapping):
        return None
    pos = Pos.of(raw.get("pos"))
    severity = raw.get("severity")
    data = raw.get("data")
    if pos is None or not isinstance(severity, str) or not isinstance(data, str):
        return None
    return LeanMessage(severity, pos, Pos.of(raw.get("endPos")), data)


def _sorry(raw: Any) -> LeanSorry | None:
    if not isinstance(raw, Mapping):
        return None
    ps = raw.get("proofState")
    return LeanSorry(Pos.of(raw.get("pos")), Pos.of(raw.get("endPos")), str(raw.get("goal", "")),
                     ps if isinstance(ps, int) else None)


def parse_command_response(obj: Any, time_s: float = 0.0) -> LeanOutcome:
    """A REPL command-mode answer (`{env, messages?, sorries?, tactics?}`, fields left out when empty, or
    the error shape `{"message": ...}`) as an outcome. Anything else is a protocol error."""
    if not isinstance(obj, Mapping):
        return error_outcome(f"Lean answer is a {type(obj).__name__}, not a JSON object", time_s)
    if "message" in obj and "env" not in obj:
        return error_outcome(f"Lean REPL error: {str(obj['message'])[:500]}", time_s)
    raw_messages = obj.get("messages") or []
    raw_sorries = obj.get("sorries") or []
    if not isinstance(raw_messages, list) or not isinstance(raw_sorries, list):
        return error_outcome("Lean answer has `messages`/`sorries` that are not lists", time_s)
    messages = [_message(m) for m in raw_messages]
    sorries = [_sorry(s) for s in raw_sorries]
    if any(m is None for m in messages) or any(s is None for s in sorries):
        return error_outcome("Lean answer has a malformed message or sorry (missing pos/severity/data)", time_s)
    env = obj.get("env")
    return LeanOutcome(tuple(messages), tuple(sorries), env if isinstance(env, int) else None, time_s=time_s)


def first_error(outcome: LeanOutcome, *, start_line: int = 1) -> Pos | None:
    """The first error position at or after `start_line`: min over error messages (not "unsolved goals")
    and sorries. None when the outcome has none (valid, or only unsolved goals)."""
    positions = [m.pos for m in outcome.errors if not m.data.startswith(UNSOLVED_GOALS)]
    positions += [s.pos for s in outcome.sorries if s.pos is not None]
    positions = [p for p in positions if p.line >= start_line]
    return min(positions) if positions else None


def describe(outcome: LeanOutcome) -> str:
    """A one-line verdict detail: the first problem with its position (relative to the proof body)."""
    if outcome.timed_out or outcome.error is not None:
        return (outcome.error or "timed out")[:300]
    for m in sorted(outcome.errors, key=lambda m: m.pos):
        return f"error at {m.pos.line}:{m.pos.column}: {m.data[:200]}"
    if outcome.has_sorry:
        return "proof uses sorry"
    return "proof checked"


def lean_verdict(outcome: LeanOutcome, *, verifier: str, version: str) -> Verdict:
    status = outcome.status
    score = None if not status.decided else float(status is Status.VALID)
    return Verdict(verifier, version, status, score, describe(outcome))
