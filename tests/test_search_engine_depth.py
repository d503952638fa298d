"""The engine measures each request's dependency depth (for the throughput benchmark's bound); it never
changes what is requested."""

from __future__ import annotations

import asyncio

from tasks.budget import BudgetConfig
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=6, seed=3)).problems


def _shard(make_engine, cfg, budget=None):
    async def go():
        eng = make_engine()
        return await run_shard(PROBLEMS, eng, cfg, budget=budget), eng.stats

    return asyncio.run(go())


def test_math_shepherd_has_two_dependent_levels(make_engine):
    _, stats = _shard(make_engine, MathShepherdConfig(k=4))
    # Level 0: the solutions and the root estimate (it needs no solution); level 1: every prefix estimate.
    assert sorted(stats.requests_by_depth) == [0, 1]
    assert stats.requests_by_depth[0] == 2 * len(PROBLEMS)
    assert sum(stats.requests_by_depth.values()) == stats.policy_requests
    _, probed = _shard(make_engine, MathShepherdConfig(k=4), BudgetConfig(enabled=True))
    assert sorted(probed.requests_by_depth) == [0, 1, 2], "the probes come first, everything else after them"
    assert probed.requests_by_depth[0] == len(PROBLEMS)


def test_omegaprm_binary_search_is_a_long_chain_and_tracking_changes_nothing(make_engine):
    res, stats = _shard(make_engine, OmegaPRMConfig(k=4, rollout_budget=40))
    assert sum(stats.requests_by_depth.values()) == stats.policy_requests
    assert max(stats.requests_by_depth) >= 3, "root estimate, then one binary-search probe after another"
    again, _ = _shard(make_engine, OmegaPRMConfig(k=4, rollout_budget=40))
    assert all(res.tables[t].equals(again.tables[t]) for t in res.tables)
