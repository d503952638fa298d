"""MCTS: UCT / PUCT on hand-built trees, backup bookkeeping, priors, ReST-MCTS* targets."""

from __future__ import annotations

import asyncio
import math

import pytest

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig
from tasks.problem import Problem
from tasks.search.mcts import MCTSConfig, backup, own_value, priors, puct, rest_value_targets, run_problem, select_child, uct
from tasks.search.tree import Node, Tree
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question


def hand_tree(stats: list[tuple[int, float, float | None]]) -> tuple[Tree, Node, list[Node]]:
    """A root with children given as (visits, value_sum, prior_logprob)."""
    tree = Tree(Problem("t", "Q?", "1"), "mcts", "p")
    kids = []
    for i, (n, w, lp) in enumerate(stats):
        ch = tree.child(tree.root, f"step {i}", prior_logprob=lp)
        ch.visits, ch.value_sum = n, w
        kids.append(ch)
    tree.root.visits = sum(n for n, _, _ in stats)
    return tree, tree.root, kids


def test_uct_picks_by_formula_and_tries_unvisited_children_first():
    _, root, kids = hand_tree([(10, 6.0, None), (2, 0.0, None), (5, 4.0, None)])
    c = 1.0
    scores = [k.q + c * math.sqrt(math.log(17) / k.visits) for k in kids]
    assert [uct(17, k, c) for k in kids] == pytest.approx(scores)
    assert select_child(root, kids, "uct", c) is kids[max(range(3), key=scores.__getitem__)]
    # Exploitation only: the best mean wins.
    assert select_child(root, kids, "uct", 0.0) is kids[2]
    _, root, kids = hand_tree([(10, 9.0, None), (0, 0.0, None)])
    assert select_child(root, kids, "uct", 1.0) is kids[1]


def test_puct_uses_normalised_exp_logprob_priors_or_uniform():
    _, root, kids = hand_tree([(4, 2.0, math.log(0.6)), (1, 0.0, math.log(0.2)), (0, 0.0, math.log(0.2))])
    ps = priors(kids)
    assert ps == pytest.approx([0.6, 0.2, 0.2])
    c = 2.0
    expected = [k.q + c * p * math.sqrt(5) / (1 + k.visits) for k, p in zip(kids, ps)]
    assert [puct(5, k, p, c) for k, p in zip(kids, ps)] == pytest.approx(expected)
    assert select_child(root, kids, "puct", c) is kids[max(range(3), key=expected.__getitem__)]
    # Any child without a log-prob (backend gave none) makes the priors uniform.
    kids[0].prior_logprob = None
    assert priors(kids) == pytest.approx([1 / 3] * 3)
    # A strong prior beats a slightly better mean when visits are few.
    _, root, kids = hand_tree([(1, 0.2, math.log(0.9)), (1, 0.3, math.log(0.1))])
    assert select_child(root, kids, "puct", 1.0) is kids[0]
    assert select_child(root, kids, "puct", 0.0) is kids[1]


def test_backup_adds_one_visit_and_the_reward_to_every_node_on_the_path():
    tree, root, (a,) = hand_tree([(0, 0.0, None)])
    b = tree.child(a, "deeper")
    backup([root, a, b], -1.0)
    backup([root, a], 0.5)
    assert (root.visits, root.value_sum, a.visits, a.value_sum, b.visits, b.value_sum) == (2, -0.5, 2, -0.5, 1, -1.0)
    b.add_rollouts(4, 1)
    assert own_value(b) == pytest.approx(-0.5)


def test_rest_value_targets():
    assert rest_value_targets([True, True, True]) == pytest.approx([1 / 3, 2 / 3, 1.0])
    v = rest_value_targets([True, False, False])
    assert v[0] == pytest.approx(1 / 3) and v[1] < v[0] and v[2] == 0.0 and min(v) >= 0.0


def _run(make_engine, cfg: MCTSConfig, n: int = 4, rate: float = 0.3):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n, seed=4, min_steps=3, max_steps=6)).problems

    async def go():
        engine = make_engine(rate)
        return list(await asyncio.gather(*(run_problem(engine, p, cfg) for p in problems)))

    return asyncio.run(go())


@pytest.mark.parametrize("selection,parallel", [("uct", 1), ("puct", 1), ("uct", 4), ("puct", 4)])
def test_visit_counts_and_value_sums_add_up(selection, parallel, make_engine):
    results = _run(make_engine, MCTSConfig(selection=selection, iterations=16, k=4, parallel_iterations=parallel))
    for res in results:
        tree = res.tree
        assert tree.root.visits == sum(ch.visits for ch in tree.children(tree.root)) > 0
        assert tree.root.value_sum == pytest.approx(sum(ch.value_sum for ch in tree.children(tree.root)))
        for node in tree:
            if node is tree.root:
                continue
            kids = tree.children(node)
            if node.is_terminal:
                # Every visit of a finished solution backs up its own +1 / -1.
                assert node.value_sum == pytest.approx(node.visits * own_value(node)) and not kids
            elif kids:
                # One visit of its own evaluation, the rest passed through to its children.
                assert node.visits == 1 + sum(ch.visits for ch in kids)
                assert node.value_sum == pytest.approx(own_value(node) + sum(ch.value_sum for ch in kids))
                assert node.rollouts == 4 and node.prior_logprob is not None
            assert -1.0 <= node.q <= 1.0
        assert all(leaf.is_terminal for leaf in res.leaves)
    assert any(res.leaves for res in results), "some search reached a finished solution"


def test_terminal_rewards_come_from_the_outcome_verifier_and_search_is_deterministic(make_engine):
    results = _run(make_engine, MCTSConfig(iterations=12, k=4), n=3)
    for res in results:
        spec = parse_question(res.tree.problem.question)[0]
        for leaf in res.leaves:
            correct = first_error(spec, res.tree.steps(leaf)) is None and len(res.tree.steps(leaf)) == len(spec.ops)
            assert own_value(leaf) == (1.0 if correct else -1.0)
    again = _run(make_engine, MCTSConfig(iterations=12, k=4), n=3)
    assert [r.tree.to_rows() for r in results] == [r.tree.to_rows() for r in again]


def test_max_depth_stops_expansion(make_engine):
    for res in _run(make_engine, MCTSConfig(iterations=20, k=2, max_depth=2), n=2):
        assert max(n.depth for n in res.tree) <= 2


def test_rest_value_targets_fill_the_q_value_column(make_engine):
    from tasks.shard import run_shard

    problems = load_synthetic(SyntheticSourceConfig(num_problems=4, seed=4, min_steps=3, max_steps=6)).problems

    async def go(target):
        engine = make_engine()
        return await run_shard(problems, engine, MCTSConfig(iterations=12, k=4, value_target=target))

    mean, rest = asyncio.run(go("mean")), asyncio.run(go("rest"))
    assert mean.tables["nodes"].equals(rest.tables["nodes"]), "the option changes a derived column only"
    by_sol: dict[str, list[dict]] = {}
    for row in rest.tables["steps"].to_pylist():
        by_sol.setdefault(row["solution_id"], []).append(row)
    assert by_sol
    rescued = 0
    for rows in by_sol.values():
        rows.sort(key=lambda r: r["step_index"])
        fe = rows[0]["first_error_index"]
        # The same notion as first_error_index: a step reaches the answer iff it precedes the first error.
        ok = [fe is None or r["step_index"] < fe for r in rows]
        assert [r["q_value"] for r in rows] == pytest.approx(rest_value_targets(ok))
        rescued += sum(o and r["mc_c"] == 0 for o, r in zip(ok, rows))
    # Steps whose own rollouts all failed but a continuation below them reached the answer: where a
    # node-local "c > 0" would disagree with first_error_index.
    assert rescued > 0
    assert any(r["q_value"] < 0 for r in mean.tables["steps"].to_pylist()), "mean backup: Q in [-1, 1]"


def test_virtual_loss_steers_the_next_selection_of_a_wave_elsewhere():
    _, root, kids = hand_tree([(4, 3.0, None), (4, 2.0, None)])
    assert select_child(root, kids, "uct", 0.5) is kids[0]
    # One pending selection through kids[0]: it counts as a visit with reward -1, so kids[1] is next.
    assert select_child(root, kids, "uct", 0.5, {root.node_id: 1, kids[0].node_id: 1}) is kids[1]
    assert uct(8, kids[0], 0.5, vloss=0) == uct(8, kids[0], 0.5), "no virtual loss: the plain formula"
    assert puct(9, kids[0], 0.5, 1.0, vloss=1) == pytest.approx((3.0 - 1) / 5 + 0.5 * 3 / 6)
    assert (kids[0].visits, kids[0].value_sum) == (4, 3.0), "virtual loss is never written to the node"


def test_parallel_iterations_keep_several_requests_in_flight_per_tree_deterministically(make_engine):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=3, seed=4, min_steps=4, max_steps=6)).problems

    class Counting(SimulatedPolicy):
        """Counts the scheduler's rounds of requests (one `generate` call per batch)."""

        calls: list[int]

        async def generate(self, requests):
            self.calls.append(len(requests))
            return await super().generate(requests)

    async def go(parallel):
        policy = Counting(SimulatedPolicyConfig(step_error_rate=0.3), PromptConfig().step_format)
        policy.calls = []
        engine = make_engine(policy=policy)
        res = list(await asyncio.gather(*(run_problem(engine, p, MCTSConfig(iterations=24, k=2,
                                                                            parallel_iterations=parallel))
                                        for p in problems)))
        return res, policy.calls

    seq, seq_calls = asyncio.run(go(1))
    par, par_calls = asyncio.run(go(4))
    again, _ = asyncio.run(go(4))
    assert [r.tree.to_rows() for r in par] == [r.tree.to_rows() for r in again], "deterministic"
    assert [r.tree.to_rows() for r in par] != [r.tree.to_rows() for r in seq]
    assert all(r.info["iterations"] == 24 for r in par)
    assert sum(par_calls) / len(par_calls) > sum(seq_calls) / len(seq_calls), "more requests in flight per round"
    assert max(par_calls) > max(seq_calls)
    assert sum(len(r.tree.nodes) for r in par) > sum(len(r.tree.nodes) for r in seq), "the wave spreads out"
