"""`lean.kind=leandojo`: an adapter over LeanDojo's `Dojo` (optional extra `stepforge[leandojo]`).

LeanDojo runs tactics against a theorem of a traced repository: `Dojo(Theorem(LeanGitRepo(url, commit),
file_path, full_name))` entered as a context manager gives `(dojo, initial_state)`, and
`dojo.run_tac(state, tactic)` returns a `TacticState` (goals left, `.pp`), `ProofFinished`, `LeanError`
(`.error`) or `ProofGivenUp` (a `sorry`). It needs elan, git and a traced repository, none of which exist
on the machines this was built on: only this adapter's boundary is tested, with a fake module.

A proof is a list of tactics, one per step. The outcome puts step i on body line i + 1, so the verdict
rules and the first-error locator of `verdict.py` apply unchanged: a `LeanError` is an error message on
its step's line, `ProofGivenUp` a sorry there, tactics left unrun after one fails are not judged, and a
proof that runs out of tactics with goals left ends with "unsolved goals".
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import ConfigError
from verifiers.base import Verdict
from verifiers.lean.verdict import LeanMessage, LeanOutcome, LeanSorry, Pos, error_outcome, lean_verdict, timeout_outcome

NAME = "lean-leandojo"


class LeanDojoConfig(BaseModel):
    """LeanDojo's `Dojo` over a traced repository."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["leandojo"] = "leandojo"
    repo_url: str = Field(..., min_length=1, description="Git URL of the traced Lean repository.")
    commit: str = Field(..., min_length=7, description="Commit of the repository the theorems come from.")
    timeout_s: int = Field(600, ge=1, description="LeanDojo's own time limit for a Dojo session (seconds).")
    workers: int = Field(1, ge=1, le=64, description="Dojo sessions run at once (each is a Lean process).")


@dataclass(frozen=True)
class LeanDojoItem:
    """A theorem of the traced repository and the tactics of a proof attempt, one per step."""

    file_path: str
    full_name: str
    tactics: tuple[str, ...]


def _lean_dojo() -> Any:
    try:
        return importlib.import_module("lean_dojo")
    except ImportError:
        raise ConfigError("`verifier.lean.kind=leandojo` needs LeanDojo: pip install 'stepforge[leandojo]' (it "
                          "also needs elan and git on PATH).", field="verifier.lean.kind", value="leandojo") from None


def run_tactics(dojo_mod: Any, cfg: LeanDojoConfig, item: LeanDojoItem) -> LeanOutcome:
    """Runs the tactics in one Dojo session (blocking); never raises for what Lean or LeanDojo does."""
    t0 = time.monotonic()
    timeout_errors = tuple(getattr(dojo_mod, n) for n in ("DojoTacticTimeoutError", "DojoHardTimeoutError")
                           if isinstance(getattr(dojo_mod, n, None), type))
    try:
        repo = dojo_mod.LeanGitRepo(cfg.repo_url, cfg.commit)
        theorem = dojo_mod.Theorem(repo, item.file_path, item.full_name)
        messages: list[LeanMessage] = []
        sorries: list[LeanSorry] = []
        finished = False
        with dojo_mod.Dojo(theorem, timeout=cfg.timeout_s) as (dojo, state):
            for i, tactic in enumerate(item.tactics):
                pos, end = Pos(i + 1, 0), Pos(i + 1, len(tactic))
                result = dojo.run_tac(state, tactic)
                if isinstance(result, dojo_mod.LeanError):
                    messages.append(LeanMessage("error", pos, end, str(getattr(result, "error", result))))
                    break
                if isinstance(result, dojo_mod.ProofGivenUp):
                    sorries.append(LeanSorry(pos, end, getattr(state, "pp", ""), None))
                    break
                if isinstance(result, dojo_mod.ProofFinished):
                    finished = True
                    if i + 1 < len(item.tactics):
                        messages.append(LeanMessage("error", Pos(i + 2, 0), None, "no goals to be proved"))
                    break
                state = result
            if not finished and not messages and not sorries:
                messages.append(LeanMessage("error", Pos(1, 0), None,
                                            "unsolved goals\n" + str(getattr(state, "pp", ""))))
        return LeanOutcome(tuple(messages), tuple(sorries), time_s=time.monotonic() - t0)
    except timeout_errors as exc:
        return timeout_outcome(f"LeanDojo timed out: {exc}", time.monotonic() - t0)
    except Exception as exc:  # DojoInitError, DojoCrashError, anything the toolchain throws
        return error_outcome(f"LeanDojo failed ({type(exc).__name__}): {str(exc)[:300]}", time.monotonic() - t0)


class LeanDojoVerifier:
    name = NAME

    def __init__(self, config: LeanDojoConfig) -> None:
        self.config = config
        self._mod = _lean_dojo()
        self.version = f"lean_dojo-{getattr(self._mod, '__version__', 'unknown')}"

    async def check(self, batch: Sequence[LeanDojoItem]) -> list[LeanOutcome]:
        sem = asyncio.Semaphore(self.config.workers)

        async def one(item: LeanDojoItem) -> LeanOutcome:
            async with sem:
                return await asyncio.to_thread(run_tactics, self._mod, self.config, item)

        return list(await asyncio.gather(*(one(i) for i in batch)))

    async def verify(self, batch: Sequence[LeanDojoItem]) -> list[Verdict]:
        return [lean_verdict(o, verifier=self.name, version=self.version) for o in await self.check(batch)]

    async def aclose(self) -> None:
        return None
