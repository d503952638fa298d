"""Verifiers by config `kind`: one typed record per verifier, the shape of every stepforge registry (see
`storage/exports/__init__.py`). A new verifier is one module (a config model whose `kind` field is a
one-value `Literal`, and a class following `verifiers.base.Verifier`) plus one line in `VERIFIERS`;
`flows/config.py` builds its `verifier` union from the records of role `outcome`.

Capabilities the engine asks about:
- `role`: `outcome` verifiers judge a finished solution's answer against the gold one (`OutcomeItem`);
  `step` verifiers judge single steps.
- `needs_policy`: the verifier asks an LLM (a judge) and is handed the build's policy by the flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel

from verifiers import outcome
from verifiers.base import Verifier
from verifiers.lean import outcome as lean_outcome

__all__ = ["VERIFIERS", "DEFAULT", "TAG", "VerifierKind", "make_verifier"]

TAG = "kind"
DEFAULT = outcome.NAME


@dataclass(frozen=True)
class VerifierKind:
    """`factory(cfg)` (or `factory(cfg, policy)` where `needs_policy`) builds the verifier."""

    name: str
    config: type[BaseModel]
    factory: Callable[..., Verifier]
    role: Literal["outcome", "step"] = "outcome"
    needs_policy: bool = False


VERIFIERS: dict[str, VerifierKind] = {
    v.name: v
    for v in (
        VerifierKind(outcome.NAME, outcome.OutcomeVerifierConfig, outcome.OutcomeVerifier),
        VerifierKind(lean_outcome.NAME, lean_outcome.LeanVerifierConfig, lean_outcome.make_verifier),
    )
}


def make_verifier(cfg: Any, policy: Any = None) -> Verifier:
    """The verifier `cfg` describes (its `kind` picks the record)."""
    kind = VERIFIERS[cfg.kind]
    return kind.factory(cfg, policy) if kind.needs_policy else kind.factory(cfg)
