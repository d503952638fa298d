"""The content-addressed rollout cache: a hit gives the same statistics as a fresh computation, and the
seeds of a prefix's rollouts do not depend on the algorithm, so algorithms share estimates."""

from __future__ import annotations

import asyncio

from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.mcts import MCTSConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.search.rollout_cache import RolloutCache
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=6, seed=9)).problems


async def _shard(eng, cfg):
    return await run_shard(PROBLEMS, eng, cfg), eng


def test_cache_hit_returns_the_same_statistics_as_a_fresh_computation(tmp_path, make_engine):
    cache = RolloutCache(tmp_path / "rollouts.sqlite")
    p = PROBLEMS[0]
    steps = ["Stepping stone."]

    async def go(eng):
        return await eng.rollouts(p, [], 16), await eng.rollouts(p, steps, 8)

    fresh_engine = make_engine()
    fresh = asyncio.run(go(fresh_engine))
    first_engine = make_engine(cache=cache)
    first = asyncio.run(go(first_engine))
    reopened = RolloutCache(tmp_path / "rollouts.sqlite")  # another run, another process's view
    hit_engine = make_engine(cache=reopened)
    hit = asyncio.run(go(hit_engine))
    for a, b, c in zip(fresh, first, hit):
        assert (a.k, a.c, a.undecided) == (b.k, b.c, b.undecided) == (c.k, c.c, c.undecided)
        assert [x.text for x in a.completions] == [x.text for x in c.completions]
        assert a.completions == c.completions and [v.status for v in a.verdicts] == [v.status for v in c.verdicts]
    assert first_engine.stats.policy_requests == 2 and first_engine.stats.cache_hits == 0
    assert hit_engine.stats.policy_requests == 0 and hit_engine.stats.cache_hits == 2


def test_estimates_are_shared_across_algorithms_and_do_not_change_the_data(tmp_path, make_engine):
    cache = RolloutCache(tmp_path / "rollouts.sqlite")
    ms, _ = asyncio.run(_shard(make_engine(cache=cache), MathShepherdConfig(k=16)))
    om_cached, om_engine = asyncio.run(_shard(make_engine(cache=cache), OmegaPRMConfig(k=16, rollout_budget=96)))
    # The root estimate (k = 16, purpose "rollout") was made by Math-Shepherd: a hit for OmegaPRM.
    assert om_engine.stats.cache_hits >= ms.stats.problems - sum(om_cached.stats.skipped.values()) > 0
    om_fresh, fresh_engine = asyncio.run(_shard(make_engine(), OmegaPRMConfig(k=16, rollout_budget=96)))
    assert fresh_engine.stats.cache_hits == 0
    for name in ("nodes", "steps", "pairs"):
        assert om_cached.tables[name].equals(om_fresh.tables[name]), name
    # And an MCTS run over the same cache reuses OmegaPRM's probes of every problem.
    mc_cached, mc_engine = asyncio.run(_shard(make_engine(cache=cache), MCTSConfig(iterations=4)))
    assert mc_engine.stats.cache_hits >= len(PROBLEMS)


def test_within_a_shard_equal_requests_are_answered_once(make_engine):
    res, eng = asyncio.run(_shard(make_engine(), OmegaPRMConfig(k=8, rollout_budget=64)))
    # First-error pairs re-read the prefix's rollouts: memo hits, not new policy requests.
    assert res.stats.pairs_by_kind.get("first_error", 0) > 0
    assert eng.stats.memo_hits >= 1
    assert eng.stats.policy_requests == eng.policy.usage.requests
