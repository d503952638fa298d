"""Formal verification with Lean 4: backends that speak the real protocols, and one set of verdict rules.

- `lean.kind=repl` (`repl.py`): a pool of `leanprover-community/repl` processes with stated limits;
- `lean.kind=kimina` (`kimina.py`): a client for the Kimina Lean Server's `POST /api/check`;
- `lean.kind=leandojo` (`leandojo.py`): an adapter over LeanDojo's `Dojo` (optional extra);
- `verdict.py`: how any backend's answer becomes `valid | invalid | timeout | error`, and where a proof's
  first error is;
- `testing/`: stand-ins that speak the REPL and Kimina protocols over a checker of a stated fragment of
  Lean (not Lean), for tests and benchmarks where no Lean toolchain installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union

from pydantic import BaseModel, Field

from verifiers.lean.base import LeanItem
from verifiers.lean.kimina import KiminaConfig, KiminaVerifier
from verifiers.lean.leandojo import LeanDojoConfig, LeanDojoItem, LeanDojoVerifier
from verifiers.lean.repl import LeanPoolOverloaded, LeanReplConfig, LeanReplVerifier, ReplPool
from verifiers.lean.verdict import LeanOutcome, first_error, lean_verdict, parse_command_response

TAG = "kind"


@dataclass(frozen=True)
class LeanBackend:
    """One Lean backend, the shape of every stepforge registry. `checks_code`: it checks Lean source text
    (`LeanItem`s), which the formal domain needs; `tactic_mode`: it can run a proof step by step."""

    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    checks_code: bool = True
    tactic_mode: bool = False


BACKENDS: dict[str, LeanBackend] = {
    b.name: b
    for b in (
        # A build's shards share one REPL pool per config: headers are elaborated once per process.
        LeanBackend("repl", LeanReplConfig, lambda cfg: LeanReplVerifier(cfg, shared=True), tactic_mode=True),
        LeanBackend("kimina", KiminaConfig, KiminaVerifier),
        LeanBackend("leandojo", LeanDojoConfig, LeanDojoVerifier, checks_code=False),
    )
}

LeanConfig = Annotated[Union[LeanReplConfig, KiminaConfig, LeanDojoConfig], Field(discriminator=TAG)]
# The backends that check Lean text (what the formal domain sends).
LeanCodeConfig = Annotated[Union[LeanReplConfig, KiminaConfig], Field(discriminator=TAG)]


def make_lean_verifier(cfg: Any) -> Any:
    """The verifier for a Lean backend config (its `kind` picks the record)."""
    return BACKENDS[cfg.kind].factory(cfg)


__all__ = [
    "BACKENDS", "KiminaConfig", "KiminaVerifier", "LeanBackend", "LeanCodeConfig", "LeanConfig", "LeanDojoConfig",
    "LeanDojoItem", "LeanDojoVerifier", "LeanItem", "LeanOutcome", "LeanPoolOverloaded", "LeanReplConfig",
    "LeanReplVerifier", "ReplPool", "TAG", "first_error", "lean_verdict", "make_lean_verifier",
    "parse_command_response",
]
