"""The stand-in's REPL state machine: environments, proof states, and the JSON the REPL answers with.

Shared by the stdio REPL stand-in and the Kimina stand-in, so both answer with the same shapes:
command mode `{env, messages?, sorries?}` (fields left out when empty), tactic mode `{proofState, goals,
messages?, sorries?, proofStatus?}` (`proofStatus` only when imitating Lean v4.19 or later), and the error
object `{"message": ...}` ("Unknown environment.", "Unknown proof state.", "Lean error:\n..." for a tactic
that threw, and the stand-in's own "outside the fragment" refusal, which never starts with "Lean error:").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verifiers.lean.testing.checker import (Claim, Context, Goal, Msg, OutsideFragment, TacticFailed, check_declaration,
                                            parse_declaration, parse_tactic_text, run_block, split_commands)

KNOWN_MODULE_ROOTS = ("Mathlib", "Init", "Std", "Lean", "Aesop", "Batteries", "Qq", "Plausible")


def parse_version(text: str) -> tuple[int, int]:
    """`4.19`, `v4.19.0`, `4.28.0-rc1` -> (4, 19)."""
    parts = text.lstrip("v").split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"Lean version {text!r} is not of the form 4.N (e.g. 4.19)") from None


@dataclass
class EnvState:
    mathlib: bool
    theorems: dict[str, Claim] = field(default_factory=dict)


@dataclass
class ProofState:
    goals: list[Goal]
    env: EnvState
    sorry_used: bool = False


class StandinLean:
    """One REPL process's state. `version` switches the quirks: proofStatus from 4.19, sorry quoting at 4.28."""

    def __init__(self, version: str = "4.19") -> None:
        self.version = parse_version(version)
        self.envs: list[EnvState] = []
        self.proof_states: list[ProofState] = []

    @property
    def has_proof_status(self) -> bool:
        return self.version >= (4, 19)

    @property
    def old_sorry_quote(self) -> bool:
        return self.version < (4, 28)

    def _sorry_json(self, line: int, column: int, goal: Goal, env: EnvState, line_shift: int = 0) -> dict:
        self.proof_states.append(ProofState([goal], env))
        return {"proofState": len(self.proof_states) - 1, "pos": {"line": line + line_shift, "column": column},
                "goal": goal.pretty(), "endPos": {"line": line + line_shift, "column": column + 5}}

    def command(self, cmd: str, env: int | None = None) -> dict[str, Any]:
        if env is not None and not (isinstance(env, int) and 0 <= env < len(self.envs)):
            return {"message": "Unknown environment."}
        try:
            imports, decls, _ = split_commands(cmd)
            messages: list[Msg] = []
            if env is None:
                state = EnvState(mathlib=False)
            else:
                base = self.envs[env]
                state = EnvState(base.mathlib, dict(base.theorems))
            for no, line in imports:
                if env is not None or no < 0:
                    messages.append(Msg("error", abs(no), 0, abs(no), len(line),
                                        "invalid 'import' command, it must be used in the beginning of the file"))
                    continue
                for module in line.split()[1:]:
                    root = module.split(".")[0]
                    if root not in KNOWN_MODULE_ROOTS:
                        messages.append(Msg("error", no, 0, no, len(line), f"unknown module prefix '{root}'"))
                    elif root == "Mathlib":
                        state.mathlib = True
            ctx = Context(state.mathlib, state.theorems, old_sorry_quote=self.old_sorry_quote)
            for lines in decls:
                decl = parse_declaration(lines)
                if decl.name and decl.name in ctx.theorems:
                    ctx.messages.append(Msg("error", decl.name_pos[0], decl.name_pos[1], decl.name_pos[0],
                                            decl.name_pos[1] + len(decl.name),
                                            f"'{decl.name}' has already been declared"))
                    continue
                check_declaration(decl, ctx)
        except OutsideFragment as exc:
            return {"message": str(exc)}
        state.theorems = ctx.theorems
        self.envs.append(state)
        out: dict[str, Any] = {"env": len(self.envs) - 1}
        all_messages = messages + ctx.messages
        if all_messages:
            out["messages"] = [m.to_json() for m in all_messages]
        if ctx.sorries:
            out["sorries"] = [self._sorry_json(s.line, s.column, s.goal, state) for s in ctx.sorries]
        return out

    def tactic(self, tactic: str, proof_state: int) -> dict[str, Any]:
        if not (isinstance(proof_state, int) and 0 <= proof_state < len(self.proof_states)):
            return {"message": "Unknown proof state."}
        ps = self.proof_states[proof_state]
        ctx = Context(ps.env.mathlib, ps.env.theorems, old_sorry_quote=self.old_sorry_quote)
        try:
            block = parse_tactic_text(tactic)
            if not block:
                raise OutsideFragment("an empty tactic")
            goals = run_block(block, ps.goals, ctx)
        except TacticFailed as exc:
            return {"message": "Lean error:\n" + exc.data}
        except OutsideFragment as exc:
            return {"message": str(exc)}
        new = ProofState(goals, ps.env, ps.sorry_used or ctx.sorry_used or bool(ctx.messages))
        self.proof_states.append(new)
        out: dict[str, Any] = {"proofState": len(self.proof_states) - 1, "goals": [g.pretty() for g in goals]}
        if ctx.messages:
            out["messages"] = [m.to_json() for m in ctx.messages]
        if ctx.sorries:
            out["sorries"] = [self._sorry_json(s.line, s.column, s.goal, ps.env) for s in ctx.sorries]
        if self.has_proof_status:
            out["proofStatus"] = ("Incomplete: open goals remain" if goals else
                                  "Incomplete: contains sorry" if new.sorry_used else "Completed")
        return out
