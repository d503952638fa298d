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

from typing import Annotated, Union

from pydantic import Field

from verifiers.lean.base import LeanItem
from verifiers.lean.kimina import KiminaConfig, KiminaVerifier
from verifiers.lean.leandojo import LeanDojoConfig, LeanDojoItem, LeanDojoVerifier
from verifiers.lean.repl import LeanPoolOverloaded, LeanReplConfig, LeanReplVerifier, ReplPool
from verifiers.lean.verdict import LeanOutcome, first_error, lean_verdict, parse_command_response

LeanConfig = Annotated[Union[LeanReplConfig, KiminaConfig, LeanDojoConfig], Field(discriminator="kind")]


def make_lean_verifier(cfg: LeanReplConfig | KiminaConfig | LeanDojoConfig):
    """The verifier for a Lean backend config."""
    if isinstance(cfg, LeanReplConfig):
        return LeanReplVerifier(cfg)
    if isinstance(cfg, KiminaConfig):
        return KiminaVerifier(cfg)
    return LeanDojoVerifier(cfg)


__all__ = [
    "KiminaConfig", "KiminaVerifier", "LeanConfig", "LeanDojoConfig", "LeanDojoItem", "LeanDojoVerifier", "LeanItem",
    "LeanOutcome", "LeanPoolOverloaded", "LeanReplConfig", "LeanReplVerifier", "ReplPool", "first_error",
    "lean_verdict", "make_lean_verifier", "parse_command_response",
]
