"""Evaluations every algorithm shares: an MC estimate of a prefix, and the verdict of a finished solution.

Both add raw evidence to the node (k, c, verdicts). What counts as a visit is the algorithm's business
(its registry record's `rollouts_are_visits`): Math-Shepherd and OmegaPRM pass `as_visits=True`, so a
node's Q = value_sum / visits is its c / k; MCTS counts backups instead."""

from __future__ import annotations

from tasks.search.engine import Engine, RolloutStats
from tasks.search.tree import Node, Tree
from verifiers.base import Status


def count_visits(node: Node, k: int, c: int) -> None:
    """The visit rule of algorithms whose rollouts are visits: k decided rollouts, c of them correct."""
    node.visits += k
    node.value_sum += c


async def estimate(engine: Engine, tree: Tree, node: Node, k: int, purpose: str = "rollout", *,
                   as_visits: bool = False) -> RolloutStats:
    """k rollouts from `node`'s prefix; adds (k, c) and a summary verdict to the node (and as visits, if asked)."""
    stats = await engine.rollouts(tree.problem, tree.prefix(node), k, purpose=purpose)
    node.add_rollouts(stats.k, stats.c)
    if as_visits:
        count_visits(node, stats.k, stats.c)
    node.estimates.append((purpose, k))
    node.verdicts.append(stats.summary_verdict(engine.verifier.name, engine.verifier.version))
    return stats


async def estimate_adaptive(engine: Engine, tree: Tree, node: Node, k: int, chunk: int,
                            purpose: str = "rollout") -> RolloutStats:
    """Rollouts from `node`'s prefix in chunks of `chunk`, stopping after the first chunk with a correct one,
    at most k in all: enough for a hard label ("any rollout correct"), which needs no more once one is
    correct. A prefix none of whose rollouts is correct still gets all k.

    Chunk j is its own request (n = chunk, purpose `<purpose>/chunk<j>`), so its seed and its rollout-cache
    entry depend only on the prefix and j: a rerun draws the same chunks and hits the cache. The stored
    c / k is biased towards 1/k-sized values (sampling stopped at a success), so soft labels need the full
    k (`search.adaptive` off)."""
    steps = tree.prefix(node)
    total = RolloutStats(k=0, c=0, undecided=0, completions=[], verdicts=[])
    drawn = j = 0
    while drawn < k:
        n = min(chunk, k - drawn)
        stats = await engine.rollouts(tree.problem, steps, n, purpose=f"{purpose}/chunk{j}")
        total.k += stats.k
        total.c += stats.c
        total.undecided += stats.undecided
        total.completions += stats.completions
        total.verdicts += stats.verdicts
        drawn, j = drawn + n, j + 1
        if stats.c:
            break
    node.add_rollouts(total.k, total.c)
    node.estimates.append((f"{purpose}/adaptive", drawn))
    node.verdicts.append(total.summary_verdict(engine.verifier.name, engine.verifier.version))
    return total


async def mark_terminal(engine: Engine, tree: Tree, leaf: Node, *, as_visits: bool = False) -> None:
    """A finished solution is its own single rollout: k = 1, c = whether its answer is right (or nothing
    when the verifier could not decide); with `as_visits` that rollout is a visit too. Idempotent."""
    if leaf.is_terminal:
        return
    leaf.is_terminal = True
    text = engine.prefix_text(tree.prefix(leaf))  # the solution as the policy wrote it
    (verdict,) = await engine.verify([engine.outcome_item(tree.problem, text)])
    leaf.final_answer = verdict.answer
    if verdict.status.decided:
        leaf.add_rollouts(1, int(verdict.status is Status.VALID))
        if as_visits:
            count_visits(leaf, 1, int(verdict.status is Status.VALID))
    leaf.verdicts.append(verdict.to_row())
