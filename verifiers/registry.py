"""Verifiers by config `kind`: one typed record per verifier, the shape of every stepforge registry (see
`storage/exports/__init__.py`). A new verifier is one module (a config model whose `kind` field is a
one-value `Literal`, and a class following `verifiers.base.Verifier`) plus one line in `VERIFIERS`.

Capabilities the engine asks about:
- `role`: `outcome` verifiers judge a finished solution's answer against the gold one (`OutcomeItem`);
  `step` verifiers label single steps of every solution (their verdicts go to `steps.verdicts`).
- `needs_policy`: the verifier asks an LLM (the judge) and is handed a policy by the flow, built from its
  own config section (`judge.policy`, any backend of `tasks.policy.registry.JUDGE_BACKENDS`); such a
  verifier reads whole solutions (`SolutionItem`) and spreads one verdict over their steps, the others
  read one step at a time (`StepItem`).

`flows/config.py` builds its unions from these records: `verifier` from role `outcome`, `checks` from role
`step` without a policy, and the `judge` section on the one record of role `step` that needs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel

from verifiers import arith_check, code_check, judge, outcome
from verifiers.base import Verifier
from verifiers.lean import outcome as lean_outcome

__all__ = ["VERIFIERS", "DEFAULT", "TAG", "VerifierKind", "make_verifier", "step_checks", "judges"]

TAG = "kind"
DEFAULT = outcome.NAME


@dataclass(frozen=True)
class VerifierKind:
    """`factory(cfg)` builds the verifier; where `needs_policy`, `factory(cfg, policy, **context)`, the context
    being what such a verifier needs from the flow besides its model (the judge: its prompt template text,
    the backend's request factory and the build seed)."""

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
        VerifierKind(arith_check.NAME, arith_check.ArithCheckConfig, arith_check.ArithCheck, role="step"),
        VerifierKind(code_check.NAME, code_check.CodeCheckConfig, code_check.CodeCheck, role="step"),
        VerifierKind(judge.NAME, judge.JudgeConfig, judge.JudgeVerifier, role="step", needs_policy=True),
    )
}


def step_checks() -> list[VerifierKind]:
    """The step verifiers that need no model (the build's `checks` list)."""
    return [v for v in VERIFIERS.values() if v.role == "step" and not v.needs_policy]


def judges() -> list[VerifierKind]:
    """The step verifiers that ask a model (the build's `judge` section)."""
    return [v for v in VERIFIERS.values() if v.role == "step" and v.needs_policy]


def make_verifier(cfg: Any, policy: Any = None, **context: Any) -> Verifier:
    """The verifier `cfg` describes (its `kind` picks the record); `policy` and `context` only for a verifier
    that `needs_policy`."""
    kind = VERIFIERS[cfg.kind]
    if kind.needs_policy:
        if policy is None:
            raise TypeError(f"verifier {kind.name!r} asks a model: pass the policy built from its config section")
        return kind.factory(cfg, policy, **context)
    return kind.factory(cfg)
