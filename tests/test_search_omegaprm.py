"""OmegaPRM: binary search for the first error, Q + U selection, budget and evidence."""

from __future__ import annotations

import asyncio
import math

import pytest

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig, render_prompt
from tasks.search.omegaprm import Candidate, OmegaPRMConfig, binary_search, run_problem, score, select
from tasks.search.tree import Node
from storage.render import segment
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question


def problems(n: int, seed: int = 3):
    return load_synthetic(SyntheticSourceConfig(num_problems=n, seed=seed, min_steps=4, max_steps=8)).problems


def test_binary_search_finds_the_oracles_first_error_when_mc_is_exact():
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.35))
    prompt = PromptConfig()
    checked = 0
    for p in problems(30):
        spec = parse_question(p.question)[0]
        for i in range(8):
            steps = [s.text for s in segment(policy.sample(render_prompt(prompt, p.question, []), 1, i).text,
                                             prompt.step_format)]
            truth = first_error(spec, steps)
            if truth is None:
                continue
            calls: list[int] = []

            async def exact_mc(j: int, steps=steps, spec=spec) -> float:
                calls.append(j)
                # Exact MC in this domain: 0 once a step is wrong (never repaired), else positive.
                return 0.0 if first_error(spec, steps[: j + 1]) is not None else 0.6

            found, probed = asyncio.run(binary_search(len(steps), exact_mc))
            assert found == truth, (steps, truth, found)
            assert probed == calls and len(probed) <= math.ceil(math.log2(len(steps)))
            assert len(steps) - 1 not in probed, "the last (known wrong) step is never estimated"
            checked += 1
    assert checked > 30


def test_binary_search_goes_left_on_zero_right_otherwise_and_stops_when_estimates_fail():
    seen: list[int] = []

    async def mc(j: int) -> float:
        seen.append(j)
        return 0.0 if j >= 5 else 0.25

    assert asyncio.run(binary_search(8, mc)) == (5, [3, 5, 4])
    assert seen == [3, 5, 4]

    async def none(j: int):
        return None

    assert asyncio.run(binary_search(8, none)) == (None, [3])
    assert asyncio.run(binary_search(1, none)) == (0, []), "a one-step wrong rollout needs no estimate"


def _state(name: str, k: int, c: int) -> Node:
    n = Node(name, "p", None, 1, name)
    n.add_rollouts(k, c)
    return n


def test_selection_picks_what_q_plus_u_says():
    cfg = OmegaPRMConfig()
    a, b, c = _state("a", 16, 8), _state("b", 16, 14), _state("c", 16, 15)
    cands = [Candidate(a, ["x"], 100), Candidate(b, ["y"], 400), Candidate(c, ["z"], 100)]

    def by_hand(mc, tokens, n, total):
        return 0.5 ** (1 - mc) * 0.9 ** (tokens / 500) + 0.125 * math.sqrt(total) / (1 + n)

    # No visits yet: U = 0, so the likely-correct state with the short rollout wins.
    assert select(cands, {}, cfg) == 2
    assert score(15 / 16, 100, 0, 0, cfg) == pytest.approx(by_hand(15 / 16, 100, 0, 0))
    # Visits shift it: c visited 9 times, a never; U(a) = 0.125 * sqrt(10) beats c's higher Q.
    visits = {"c": 9, "b": 1}
    expected = max(range(3), key=lambda i: by_hand(cands[i].state.mc, cands[i].tokens,
                                                     visits.get(cands[i].state.node_id, 0), 10))
    assert select(cands, visits, cfg) == expected == 0
    # Longer rollouts are penalised by beta^(len/L).
    assert score(0.5, 1000, 0, 0, cfg) < score(0.5, 10, 0, 0, cfg)


@pytest.mark.parametrize("parallel", [1, 4])
def test_search_stays_in_budget_stores_raw_evidence_and_is_deterministic(parallel, make_engine):
    cfg = OmegaPRMConfig(k=8, rollout_budget=64, num_searches=10, parallel_searches=parallel)

    async def go(seed: int):
        engine = make_engine(seed=seed)
        out = [await run_problem(engine, p, cfg) for p in problems(6)]
        await engine.verifier.aclose()
        return out, engine

    results, engine = asyncio.run(go(0))
    searched = 0
    for res in results:
        assert res.info["search_rollouts"] <= res.info["budget_charged"] <= 64
        estimated = [n for n in res.tree if n.estimates]
        assert sum(k for n in estimated for _, k in n.estimates) == res.info["search_rollouts"]
        for n in res.tree:
            # Rollouts are visits in OmegaPRM's tree: visits == k and value_sum == c, node by node.
            assert (n.visits, n.value_sum) == (n.rollouts, n.rollouts_correct)
            assert 0 <= n.rollouts_correct <= n.rollouts
        searched += res.info["searches"]
    assert searched > 0
    again, _ = asyncio.run(go(0))
    assert [r.tree.to_rows() for r in results] == [r.tree.to_rows() for r in again]


@pytest.mark.parametrize("parallel", [1, 4])
def test_labelled_paths_end_at_the_oracles_first_error_with_many_rollouts(parallel, make_engine):
    cfg = OmegaPRMConfig(k=48, rollout_budget=48 * 12, num_searches=6, parallel_searches=parallel)

    async def go():
        engine = make_engine(rate=0.25)
        out = [await run_problem(engine, p, cfg) for p in problems(8, seed=11)]
        await engine.verifier.aclose()
        return out

    erroneous, exact = 0, 0
    for res in asyncio.run(go()):
        spec = parse_question(res.tree.problem.question)[0]
        for leaf in res.leaves:
            steps = res.tree.steps(leaf)
            truth = first_error(spec, steps)
            if leaf.is_terminal and leaf.rollouts_correct == 1:
                assert truth is None, "a correct rollout path is error-free in this domain"
            else:
                erroneous += 1
                # MC > 0 after an error is impossible here (no recovery), so the located error is never
                # late; it is early only where all k rollouts of a correct prefix failed (a false zero).
                assert truth in (None, len(steps) - 1), "the labelled path ends at or before its first error"
                exact += truth == len(steps) - 1
    assert erroneous >= 5
    if parallel == 1:
        assert exact == erroneous, "with these k = 48 estimates no correct prefix came out at MC = 0"
    else:  # other states get searched, one of them a correct step whose 48 rollouts all failed
        assert exact >= 0.9 * erroneous



def test_parallel_searches_give_the_same_tree_whatever_order_the_answers_land_in(make_engine):
    """Searches of one wave share the engine; answers that land in another order must not change the tree."""
    import hashlib

    class Jittery(SimulatedPolicy):
        independent_requests = True  # one call per request, routed as it lands

        def __init__(self, salt: str) -> None:
            super().__init__(SimulatedPolicyConfig(step_error_rate=0.3), PromptConfig().step_format)
            self.salt = salt

        async def generate(self, requests):
            (req,) = requests
            turns = hashlib.blake2b((self.salt + req.prompt).encode(), digest_size=1).digest()[0] % 7
            for _ in range(turns):  # a different, prompt-dependent delay per salt
                await asyncio.sleep(0)
            return await super().generate(requests)

    cfg = OmegaPRMConfig(k=8, rollout_budget=160, num_searches=10, parallel_searches=4)

    async def go(salt: str):
        engine = make_engine(policy=Jittery(salt))
        try:
            return await asyncio.gather(*(run_problem(engine, p, cfg) for p in problems(6)))
        finally:
            await engine.verifier.aclose()

    a, b = asyncio.run(go("one")), asyncio.run(go("two"))
    assert sum(r.info["searches"] for r in a) > 6
    assert [r.tree.to_rows() for r in a] == [r.tree.to_rows() for r in b]
    assert [[n.node_id for n in r.leaves] for r in a] == [[n.node_id for n in r.leaves] for r in b]
