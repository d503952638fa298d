"""`verifier.kind=lean`: Lean as the outcome verifier of the formal domain (`domain="lean"` problems).

A finished solution of a Lean problem is its statement followed by its tactic steps (`tasks/domains.py`
builds the `LeanItem`); the proof is correct when the Lean backend (`lean.kind=repl|kimina`) finds it valid,
by the one set of rules in `verdict.py`: a timeout or crash is `timeout`/`error`, never a wrong proof, so
Monte Carlo estimates (k completions per tactic prefix, each checked whole) count only judged proofs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from verifiers.lean import LeanCodeConfig, make_lean_verifier
from verifiers.lean.repl import LeanReplConfig

NAME = "lean"


class LeanVerifierConfig(BaseModel):
    """Lean 4 checks each completed proof whole (the formal domain's outcome verifier)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lean"] = "lean"
    lean: LeanCodeConfig = Field(default_factory=LeanReplConfig,  # type: ignore[valid-type]
                                 description="The Lean backend: `repl` (a pool of leanprover-community/repl "
                                 "processes) or `kimina` (a Kimina Lean Server).")

    @model_validator(mode="before")
    @classmethod
    def _default_lean_tag(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("lean"), dict) and "kind" not in data["lean"]:
            data = {**data, "lean": {"kind": LeanReplConfig().kind, **data["lean"]}}
        return data


def make_verifier(cfg: LeanVerifierConfig) -> Any:
    return make_lean_verifier(cfg.lean)
