"""Budgeting: probe each problem with a few full solutions, search only problems whose pass rate is
strictly between 0 and 1 (all-correct and all-wrong problems give no step signal), and share the search
budget out by how uncertain each problem's step signal is.

Pure functions plus one async probe; the shard runner applies them to all problems of a shard at once
(probe all, then allocate, then search), so an allocation never depends on scheduling order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.problem import Problem
from tasks.search.engine import Engine, RolloutStats

SKIP_ALL_CORRECT = "all_correct"
SKIP_ALL_WRONG = "all_wrong"
SKIP_UNDECIDED = "undecided"
SKIP_REASONS = (SKIP_ALL_CORRECT, SKIP_ALL_WRONG, SKIP_UNDECIDED)


class BudgetConfig(BaseModel):
    """Probe-then-search budgeting (OmegaPRM keeps only problems the policy sometimes solves)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Probe every problem first and search only those with 0 < pass rate < 1.")
    probe_n: int = Field(8, ge=1, description="Full solutions sampled from the bare question to estimate the pass rate.")
    reallocate: bool = Field(
        True, description="Scale each searched problem's budget by its pass-rate uncertainty p(1-p) relative to "
        "the shard's mean (1.0 = the algorithm's own default budget).")
    min_scale: float = Field(0.5, gt=0.0, description="Smallest budget multiplier a searched problem gets.")
    max_scale: float = Field(2.0, gt=0.0, description="Largest budget multiplier a searched problem gets.")

    @model_validator(mode="after")
    def _check_scales(self) -> "BudgetConfig":
        if self.min_scale > self.max_scale:
            raise ValueError(f"`search.budget.min_scale` ({self.min_scale}) must be <= `search.budget.max_scale` "
                             f"({self.max_scale}).")
        return self


@dataclass(frozen=True)
class Probe:
    k: int  # decided probe solutions
    c: int  # correct ones

    @property
    def pass_rate(self) -> float | None:
        return self.c / self.k if self.k else None


async def probe(engine: Engine, problem: Problem, cfg: BudgetConfig) -> RolloutStats:
    # Its own purpose, so the probe's samples are independent of the algorithm's root estimate and both
    # can be kept as evidence of MC(root).
    return await engine.rollouts(problem, [], cfg.probe_n, purpose="probe")


def skip_reason(p: Probe) -> str | None:
    """Why a problem yields no step signal, or None when it is worth searching."""
    if p.k == 0:
        return SKIP_UNDECIDED  # the verifier decided nothing: neither right nor wrong is known
    if p.c == p.k:
        return SKIP_ALL_CORRECT
    if p.c == 0:
        return SKIP_ALL_WRONG
    return None


def allocate(probes: Sequence[Probe], cfg: BudgetConfig) -> list[float | None]:
    """Per problem: None if skipped, else a budget multiplier for the algorithm.

    The weight is the Bernoulli variance p(1-p) of the probed pass rate: a problem solved half the time
    has the most uncertain steps; one solved 7 times out of 8 has little left to find. Multipliers are
    w / mean(w) over the searched problems, so the shard's total budget stays that of the defaults, then
    bounded by [min_scale, max_scale] (stated in the config, not a silent clamp of a user value)."""
    reasons = [skip_reason(p) for p in probes]
    weights = [p.pass_rate * (1 - p.pass_rate) if r is None else 0.0 for p, r in zip(probes, reasons)]
    searched = [w for w, r in zip(weights, reasons) if r is None]
    mean = sum(searched) / len(searched) if searched else 0.0
    out: list[float | None] = []
    for w, r in zip(weights, reasons):
        if r is not None:
            out.append(None)
        elif not cfg.reallocate or mean == 0:
            out.append(1.0)
        else:
            out.append(min(cfg.max_scale, max(cfg.min_scale, w / mean)))
    return out
