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

    enabled: bool | None = Field(
        None, description="Probe every problem first and search only those with 0 < pass rate < 1. None: the "
        "algorithm's default (on for omegaprm and mcts, off for math-shepherd, which labels every problem).")
    probe_n: int = Field(8, ge=1, description="Full solutions sampled from the bare question to estimate the pass rate.")
    reallocate: bool = Field(
        True, description="Share the shard's budget (the defaults' budget for every problem, less the probe's "
        "rollouts) over the searched problems in proportion to their pass-rate uncertainty p(1-p), within "
        "[min_scale, max_scale] of the algorithm's own default budget; off: every searched problem gets its default.")
    min_scale: float = Field(0.5, gt=0.0, description="Smallest budget multiplier a searched problem gets.")
    max_scale: float = Field(2.0, gt=0.0, description="Largest budget multiplier a searched problem gets.")

    @model_validator(mode="after")
    def _check_scales(self) -> "BudgetConfig":
        if self.min_scale > self.max_scale:
            raise ValueError(f"`budget.min_scale` ({self.min_scale}) must be <= `budget.max_scale` "
                             f"({self.max_scale}).")
        return self

    def active(self, algorithm_default: bool) -> bool:
        """Whether budgeting runs: `enabled` where set, else the algorithm's own default."""
        return algorithm_default if self.enabled is None else self.enabled


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


def allocate(probes: Sequence[Probe], cfg: BudgetConfig, per_problem: float | None = None) -> list[float | None]:
    """Per problem: None if skipped, else a budget multiplier for the algorithm (1.0 = its default budget).

    The shard's search budget is what the defaults would have spent on every problem, less what the probe
    already spent: `n_problems * per_problem - n_problems * probe_n` rollouts, i.e. `n_problems -
    n_problems * probe_n / per_problem` in multiplier units (`per_problem`: the algorithm's default rollouts
    per problem; None when it has no fixed one, e.g. Math-Shepherd, whose cost depends on solution length:
    then the probe cost is not subtracted). Skipped problems' share goes to the searched ones.

    It is shared out in proportion to the Bernoulli variance p(1-p) of the probed pass rate (a problem
    solved half the time has the most uncertain steps; one solved 7 times out of 8 has little left to
    find), each multiplier bounded to [min_scale, max_scale], and renormalised after bounding: m_i =
    clamp(lam * w_i, min_scale, max_scale) with lam chosen so that the m_i add up to the budget (water
    filling, solved exactly on the piecewise-linear sum). Where the bounds cannot hold the total (budget
    below n_searched * min_scale, or above n_searched * max_scale) the bounds win: every problem gets
    min_scale (over-spending a little, so no searched problem is starved) or max_scale (the rest stays
    unspent). With `reallocate` off every searched problem gets 1.0."""
    reasons = [skip_reason(p) for p in probes]
    searched = [i for i, r in enumerate(reasons) if r is None]
    out: list[float | None] = [None] * len(probes)
    if not searched:
        return out
    if not cfg.reallocate:
        for i in searched:
            out[i] = 1.0
        return out
    total = float(len(probes))
    if per_problem is not None and per_problem > 0:
        total -= len(probes) * cfg.probe_n / per_problem
    weights = {i: probes[i].pass_rate * (1 - probes[i].pass_rate) for i in searched}  # type: ignore[operator]
    for i, m in zip(searched, water_fill([weights[i] for i in searched], total, cfg.min_scale, cfg.max_scale)):
        out[i] = m
    return out


def water_fill(weights: Sequence[float], total: float, lo: float, hi: float) -> list[float]:
    """m_i = clamp(lam * w_i, lo, hi) with sum(m) == total (weights > 0); all lo / all hi when the bounds
    cannot hold the total.

    f(lam) = sum clamp(lam * w_i, lo, hi) is continuous, non-decreasing and linear between the breakpoints
    lo / w_i and hi / w_i, so lam is found exactly on the segment where f crosses the total: no iteration
    tolerance, and the same inputs always give the same multipliers."""
    n = len(weights)
    if total <= n * lo:
        return [lo] * n
    if total >= n * hi:
        return [hi] * n

    def f(lam: float) -> float:
        return sum(min(hi, max(lo, lam * w)) for w in weights)

    points = sorted({b for w in weights for b in (lo / w, hi / w)})
    prev = 0.0
    for b in points:
        if f(b) >= total:
            break
        prev = b
    # On (prev, b] the problems with lam * w in (lo, hi) are free; the rest sit at a bound.
    mid = (prev + b) / 2
    fixed = sum(min(hi, max(lo, mid * w)) for w in weights if not lo < mid * w < hi)
    free = sum(w for w in weights if lo < mid * w < hi)
    lam = (total - fixed) / free if free else b
    return [min(hi, max(lo, lam * w)) for w in weights]
