"""Pair makers: Step-DPO first-error pairs, rStar / MCTS-DPO sibling pairs, ranked groups, dedup."""

from __future__ import annotations

import asyncio

import pytest
from rapidfuzz.distance import Levenshtein

from storage.schema import pair_id
from tasks.pairs import PairsConfig, dedupe
from tasks.pairs import ranked, sibling
from tasks.problem import Problem
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.mcts import MCTSConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.search.tree import Tree
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic, oracle_labels, parse_question

LOOSE = PairsConfig.model_validate({"sibling": {"min_edit_distance": 0, "min_margin": 0.25}})
# rStar's margin 0.5 (on the common reward scale), only the edit distance lifted: sibling steps of the
# synthetic domain differ by a few characters. First-error pairs off: here each step has one correct text, so
# an MC sibling pair is usually the very record (same pair_id) a first-error pair already wrote.
SIBLINGS = PairsConfig.model_validate({"first_error": {"enabled": False}, "sibling": {"min_edit_distance": 0}})


def _shard(eng, cfg, pairs, n=8, seed=21):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n, seed=seed, min_steps=3, max_steps=7)).problems

    async def go():
        return await run_shard(problems, eng, cfg, pairs=pairs), eng

    return problems, *asyncio.run(go())


@pytest.mark.parametrize("cfg,pairs_cfg", [
    (MathShepherdConfig(k=64), LOOSE),
    (OmegaPRMConfig(k=64, rollout_budget=64 * 8), LOOSE),
    (MCTSConfig(k=64, iterations=10), LOOSE),
    (MathShepherdConfig(k=64, num_solutions=8), SIBLINGS),
    (OmegaPRMConfig(k=64, rollout_budget=64 * 8), SIBLINGS),
], ids=["math-shepherd", "omegaprm", "mcts", "math-shepherd-siblings", "omegaprm-siblings"])
def test_no_chosen_step_is_wrong_at_n64(cfg, pairs_cfg, make_engine):
    problems, res, eng = _shard(make_engine(), cfg, pairs_cfg)
    specs = {p.problem_id: parse_question(p.question)[0] for p in problems}
    pairs = res.tables["pairs"].to_pylist()
    assert pairs, "the algorithm produced pairs"
    kinds = {p["kind"] for p in pairs}
    assert "first_error" in kinds or pairs_cfg is SIBLINGS
    if pairs_cfg is SIBLINGS:
        siblings = [p for p in pairs if p["kind"] == "sibling"]
        assert siblings, "MC trees give sibling pairs at rStar's margin once it is on the reward scale"
        for p in siblings:
            spec = specs[p["problem_id"]]
            assert not oracle_labels(spec, list(p["prefix_steps"]) + [p["rejected"]])[-1], "rejected is wrong"
            # Written as c/k; the 0.5 margin holds on 2 * c/k - 1, i.e. 0.25 of c/k.
            assert 0.0 <= p["rejected_value"] < p["chosen_value"] <= 1.0 and p["margin"] >= 0.25
    for p in pairs:
        spec = specs[p["problem_id"]]
        prefix = list(p["prefix_steps"])
        assert all(oracle_labels(spec, prefix)), "pairs start from a correct prefix"
        assert oracle_labels(spec, prefix + [p["chosen"]])[-1], f"chosen step is wrong: {p}"
        assert p["chosen"] != p["rejected"]
        if p["kind"] == "first_error":
            assert not oracle_labels(spec, prefix + [p["rejected"]])[-1], "the first error is really wrong"
            assert p["full_chosen"].startswith(f"Step {len(prefix) + 1}: {p['chosen']}")
            assert p["full_rejected"].startswith(f"Step {len(prefix) + 1}: {p['rejected']}")
            assert p["rejected_value"] == 0.0
        if p["margin"] is not None:
            assert p["margin"] == pytest.approx(p["chosen_value"] - p["rejected_value"])
    ids = [p["pair_id"] for p in pairs]
    assert len(ids) == len(set(ids))


def _siblings(values: list[tuple[str, int, int]]):
    """A root whose children are (text, k, c) with MC-style visits."""
    tree = Tree(Problem("t", "Q?", "1"), "test", "p")
    for text, k, c in values:
        ch = tree.child(tree.root, text)
        ch.add_rollouts(k, c)
        ch.visits, ch.value_sum = k, c
    return tree


def test_rstar_sibling_pairs_respect_margin_edit_distance_and_the_2x2_cap(make_engine):
    long = "x" * 30
    tree = _siblings([("good one " + long, 10, 9), ("good two " + long, 10, 8), ("good three " + long, 10, 7),
                      ("bad", 10, 0), ("bad two", 10, 0), ("bad three", 10, 0), ("middling " + long, 10, 3)])
    eng = make_engine()
    rows = sibling.make_pairs(eng, tree, sibling.SiblingPairsConfig(), reward_scaled=False)
    assert len(rows) == 4, "two chosen x two rejected"
    assert {r["chosen"] for r in rows} == {"good one " + long, "good two " + long}
    assert all(r["rejected"] in {"bad three", "bad two", "bad"} for r in rows)
    assert all(r["margin"] >= 0.5 and Levenshtein.distance(r["chosen"], r["rejected"]) >= 20 for r in rows)
    strict = sibling.make_pairs(eng, tree, sibling.SiblingPairsConfig(min_edit_distance=40), reward_scaled=False)
    assert strict == []
    # MCTS-DPO: one pair per node, best against worst.
    (row,) = sibling.make_pairs(eng, tree, sibling.SiblingPairsConfig(mode="mcts-dpo"), reward_scaled=False)
    assert row["chosen"] == "good one " + long and row["chosen_value"] == pytest.approx(0.9)
    assert row["rejected_value"] == 0.0


def test_sibling_margin_is_on_one_reward_scale_for_every_algorithm(make_engine):
    eng = make_engine()
    cfg = sibling.SiblingPairsConfig(min_edit_distance=0)  # min_margin 0.5, rStar's
    # MC tree: c/k 0.4 vs 0.0 is 2 * 0.4 - 1 = -0.2 vs -1.0 on the reward scale: margin 0.8 >= 0.5.
    mc = _siblings([("ok step", 10, 4), ("bad step", 10, 0)])
    (row,) = sibling.make_pairs(eng, mc, cfg, reward_scaled=False)
    assert (row["chosen"], row["chosen_value"], row["rejected_value"]) == ("ok step", pytest.approx(0.4), 0.0)
    # The same node values as MCTS Q (already rewards in [-1, 1]): 0.4 - 0.0 < 0.5, no pair.
    q = _siblings([("ok step", 10, 4), ("bad step", 10, 0)])
    assert sibling.make_pairs(eng, q, cfg, reward_scaled=True) == []
    # MC c/k 0.2 vs 0.0: reward margin 0.4 < 0.5, no pair on either scale.
    assert sibling.make_pairs(eng, _siblings([("ok step", 10, 2), ("bad step", 10, 0)]), cfg, reward_scaled=False) == []


def test_ranked_groups_read_back_in_order_and_ids_deduplicate(make_engine):
    tree = _siblings([("a", 4, 4), ("b", 4, 2), ("c", 4, 1), ("d", 4, 1)])
    eng = make_engine()
    rows = ranked.make_pairs(eng, tree, ranked.RankedPairsConfig(), reward_scaled=False)
    # c and d tie (ordered by node id, deterministically): no row between them.
    assert [(r["chosen"], r["rank"]) for r in rows] == [("a", 0), ("b", 1)]
    assert rows[0]["rejected"] == "b" and rows[1]["rejected"] in {"c", "d"} and rows[1]["margin"] == 0.25
    assert len({r["group_id"] for r in rows}) == 1 and all(r["kind"] == "ranked" for r in rows)
    assert ranked.make_pairs(eng, tree, ranked.RankedPairsConfig(min_group=5), reward_scaled=False) == []
    sib = sibling.make_pairs(eng, tree, sibling.SiblingPairsConfig(mode="mcts-dpo"), reward_scaled=False)
    assert sib[0]["pair_id"] == pair_id(tree.root.node_id, sib[0]["chosen"], sib[0]["rejected"])
    assert {r["pair_id"] for r in rows}.isdisjoint({r["pair_id"] for r in sib}), "a ranking keeps its own rows"
    assert dedupe(sib + sib + rows) == sib + rows
