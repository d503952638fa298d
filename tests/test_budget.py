"""Budgeting: probe, skip problems without step signal (and say why), share the budget by uncertainty."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from tasks.budget import BudgetConfig, Probe, allocate, skip_reason
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig
from tasks.search.engine import Engine
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig


def test_skip_reasons():
    assert skip_reason(Probe(8, 8)) == "all_correct"
    assert skip_reason(Probe(8, 0)) == "all_wrong"
    assert skip_reason(Probe(0, 0)) == "undecided", "no decided verdict is not a wrong answer"
    assert skip_reason(Probe(8, 3)) is None


def test_allocation_follows_pass_rate_uncertainty_within_bounds():
    cfg = BudgetConfig(min_scale=0.5, max_scale=2.0)
    probes = [Probe(8, 4), Probe(8, 1), Probe(8, 8), Probe(8, 7), Probe(8, 0)]
    scales = allocate(probes, cfg)
    assert scales[2] is None and scales[4] is None
    w = [0.25, 7 / 64, 7 / 64]
    mean = sum(w) / 3
    assert scales[0] == pytest.approx(min(2.0, 0.25 / mean))
    assert scales[1] == pytest.approx(max(0.5, (7 / 64) / mean)) == scales[3]
    assert scales[0] > scales[1], "the most uncertain problem gets the most budget"
    assert allocate(probes, BudgetConfig(reallocate=False)) == [1.0, 1.0, None, 1.0, None]
    tight = allocate([Probe(16, 8), Probe(16, 1)], BudgetConfig(min_scale=0.9, max_scale=1.1))
    assert tight == [pytest.approx(1.1), pytest.approx(0.9)]
    with pytest.raises(ValidationError, match="min_scale"):
        BudgetConfig(min_scale=3.0, max_scale=2.0)


def test_shard_searches_only_problems_with_mixed_outcomes_and_reports_skips():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=16, seed=1)).problems
    prompt = PromptConfig()

    async def go(rate):
        eng = Engine(SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=rate), prompt.step_format),
                     OutcomeVerifier(OutcomeVerifierConfig()), prompt, seed=0)
        try:
            return await run_shard(problems, eng, OmegaPRMConfig(k=8, rollout_budget=48))
        finally:
            await eng.verifier.aclose()

    for rate, reason in ((0.0, "all_correct"), (0.6, None)):
        res = asyncio.run(go(rate))
        skipped = res.stats["skipped"]
        assert res.stats["searched"] + sum(skipped.values()) == 16
        if reason:
            assert skipped[reason] == 16 and res.stats["steps"] == 0
        else:
            assert res.stats["searched"] > 0 and skipped["all_wrong"] > 0
        nodes = res.tables["nodes"].to_pylist()
        roots = [n for n in nodes if n["parent_id"] is None]
        assert len(roots) == 16 and all(r["rollouts"] >= 8 for r in roots), "probe evidence is kept on the root"
        searched_ids = {s["problem_id"] for s in res.tables["steps"].to_pylist()}
        skipped_ids = {r["problem_id"] for r in roots if r["rollouts_correct"] in (0, r["rollouts"])
                       and r["rollouts"] == 8}
        assert searched_ids.isdisjoint(skipped_ids)
