"""Budgeting: probe, skip problems without step signal (and say why), share the budget by uncertainty."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from tasks.budget import BudgetConfig, Probe, allocate, skip_reason
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic


def test_skip_reasons():
    assert skip_reason(Probe(8, 8)) == "all_correct"
    assert skip_reason(Probe(8, 0)) == "all_wrong"
    assert skip_reason(Probe(0, 0)) == "undecided", "no decided verdict is not a wrong answer"
    assert skip_reason(Probe(8, 3)) is None


def test_allocation_shares_the_shard_budget_less_the_probe_by_uncertainty():
    cfg = BudgetConfig(probe_n=8, min_scale=0.5, max_scale=2.0)
    probes = [Probe(8, 4), Probe(8, 1), Probe(8, 8), Probe(8, 7), Probe(8, 0)]
    scales = allocate(probes, cfg, per_problem=100.0)
    assert scales[2] is None and scales[4] is None
    searched = [scales[0], scales[1], scales[3]]
    # 5 problems x 100 rollouts, less 5 x 8 probe rollouts, all of it spent on the 3 searched problems:
    # the skipped problems' share is redistributed, not dropped.
    assert sum(searched) * 100 == pytest.approx(5 * 100 - 5 * 8)
    # Proportional to p(1 - p) where no bound binds: 0.25 vs 7/64, but 0.25-share is capped at 2.0 and the
    # rest renormalised over the others, so the total still holds.
    assert scales[0] == pytest.approx(2.0)
    assert scales[1] == pytest.approx(scales[3]) == pytest.approx((4.6 - 2.0) / 2)
    assert all(0.5 <= m <= 2.0 for m in searched)
    assert allocate(probes, BudgetConfig(reallocate=False), 100.0) == [1.0, 1.0, None, 1.0, None]


def test_allocation_renormalises_after_clamping_until_the_total_holds():
    cfg = BudgetConfig(probe_n=4, min_scale=0.5, max_scale=1.5)
    # Pass rates 1/2, 1/16 (tiny weight), 7/16, 3/16 of 16 probes; two more problems skipped.
    probes = [Probe(16, 8), Probe(16, 1), Probe(16, 7), Probe(16, 3), Probe(16, 0), Probe(16, 16)]
    scales = allocate(probes, cfg, per_problem=15.0)
    got = [m for m in scales if m is not None]
    total = 6 - 6 * 4 / 15
    assert sum(got) == pytest.approx(total), "clamping never changes the shard's total"
    assert scales[1] == pytest.approx(0.5), "the near-certain problem sits at the floor"
    w = {i: probes[i].pass_rate * (1 - probes[i].pass_rate) for i in (0, 2, 3)}
    free = [i for i in w if 0.5 < scales[i] < 1.5]
    assert free == [2, 3], "some problems stay strictly inside the bounds"
    assert scales[0] == pytest.approx(1.5), "the most uncertain one is capped; its excess went to the others"
    lam = scales[free[0]] / w[free[0]]
    for i in free:
        assert scales[i] == pytest.approx(lam * w[i]), "free problems stay proportional to p(1-p)"
    for i in w:
        if i not in free:
            assert scales[i] in (pytest.approx(0.5), pytest.approx(1.5))


def test_allocation_bounds_win_when_the_total_cannot_be_met():
    probes = [Probe(8, 4), Probe(8, 2), Probe(8, 0), Probe(8, 0)]
    # Four problems' budget on two searched ones: above 2 x max_scale, so both get max_scale.
    assert allocate(probes, BudgetConfig(max_scale=1.5), 1000.0)[:2] == [1.5, 1.5]
    # The probe costs more than the defaults would spend: every searched problem still gets min_scale.
    assert allocate(probes, BudgetConfig(probe_n=8, min_scale=0.25), 4.0)[:2] == [0.25, 0.25]
    # Without a per-problem figure (Math-Shepherd) the probe is not subtracted; skipped shares still move.
    no_cost = allocate(probes, BudgetConfig(min_scale=0.1, max_scale=10.0))
    assert sum(m for m in no_cost if m is not None) == pytest.approx(4.0)
    tight = allocate([Probe(16, 8), Probe(16, 1)], BudgetConfig(min_scale=0.9, max_scale=1.1))
    assert tight == [pytest.approx(1.1), pytest.approx(0.9)]
    with pytest.raises(ValidationError, match="min_scale"):
        BudgetConfig(min_scale=3.0, max_scale=2.0)


def test_water_fill_is_exact_and_monotone():
    from tasks.budget import water_fill

    ms = water_fill([0.25, 0.1, 0.05, 0.01], 3.0, 0.2, 1.2)
    assert sum(ms) == pytest.approx(3.0)
    assert ms == sorted(ms, reverse=True), "more uncertainty, never less budget"
    assert ms[0] == pytest.approx(1.2) and ms[-1] == pytest.approx(0.2)


def test_shard_spends_the_probe_out_of_the_budget(monkeypatch, make_engine):
    from tasks import budget as budgeting
    from tasks.search import omegaprm

    seen: list[tuple[list[float | None], float | None]] = []
    real_allocate = budgeting.allocate

    def spy(probes, cfg, per_problem=None):
        scales = real_allocate(probes, cfg, per_problem)
        seen.append((scales, per_problem))
        return scales

    monkeypatch.setattr(budgeting, "allocate", spy)

    problems = load_synthetic(SyntheticSourceConfig(num_problems=12, seed=1)).problems
    cfg = OmegaPRMConfig(k=4, rollout_budget=40)
    budget = BudgetConfig(min_scale=0.1, max_scale=10.0)

    async def go():
        return await run_shard(problems, make_engine(0.4), cfg, budget=budget)

    res = asyncio.run(go())
    assert 0 < res.stats.searched < 12
    assert omegaprm.budget_rollouts(cfg) == 40
    # Probe (12 x 8) + search never exceeds what the defaults would have spent on all 12 problems (up to
    # the rounding of each problem's budget to whole estimates of k rollouts).
    assert res.stats.rollouts <= 12 * 40 + 4 * res.stats.searched
    # The shard handed allocate the algorithm's per-problem default, and the searched problems' multipliers
    # add up to the whole shard's budget less the probe (12 problems x 8 probe rollouts), in units of 40.
    ((scales, per_problem),) = seen
    assert per_problem == 40
    searched = [m for m in scales if m is not None]
    assert len(searched) == res.stats.searched
    assert sum(searched) == pytest.approx((12 * 40 - 12 * budget.probe_n) / 40)


def test_shard_searches_only_problems_with_mixed_outcomes_and_reports_skips(make_engine):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=16, seed=1)).problems
    async def go(rate):
        return await run_shard(problems, make_engine(rate), OmegaPRMConfig(k=8, rollout_budget=48))

    for rate, reason in ((0.0, "all_correct"), (0.6, None)):
        res = asyncio.run(go(rate))
        skipped = res.stats.skipped
        assert res.stats.searched + sum(skipped.values()) == 16
        if reason:
            assert skipped[reason] == 16 and res.stats.steps == 0
        else:
            assert res.stats.searched > 0 and skipped["all_wrong"] > 0
        nodes = res.tables["nodes"].to_pylist()
        roots = [n for n in nodes if n["parent_id"] is None]
        assert len(roots) == 16 and all(r["rollouts"] >= 8 for r in roots), "probe evidence is kept on the root"
        searched_ids = {s["problem_id"] for s in res.tables["steps"].to_pylist()}
        skipped_ids = {r["problem_id"] for r in roots if r["rollouts_correct"] in (0, r["rollouts"])
                       and r["rollouts"] == 8}
        assert searched_ids.isdisjoint(skipped_ids)
