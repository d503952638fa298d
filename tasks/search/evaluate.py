"""Evaluations every algorithm shares: an MC estimate of a prefix, and the verdict of a finished solution.

Both only add raw evidence to the node (k, c, verdicts); what counts as a visit is the algorithm's
business (Math-Shepherd and OmegaPRM count rollouts, MCTS counts backups)."""

from __future__ import annotations

from tasks.search.engine import Engine, RolloutStats
from tasks.search.tree import Node, Tree
from verifiers.base import OutcomeItem, Status


async def estimate(engine: Engine, tree: Tree, node: Node, k: int, purpose: str = "rollout") -> RolloutStats:
    """k rollouts from `node`'s prefix; adds (k, c) and a summary verdict to the node."""
    stats = await engine.rollouts(tree.problem, tree.prefix(node), k, purpose=purpose)
    node.add_rollouts(stats.k, stats.c)
    node.estimates.append((purpose, k))
    node.verdicts.append(stats.summary_verdict(engine.verifier.name, engine.verifier.version))
    return stats


async def mark_terminal(engine: Engine, tree: Tree, leaf: Node) -> None:
    """A finished solution is its own single rollout: k = 1, c = whether its answer is right (or nothing
    when the verifier could not decide). Idempotent."""
    if leaf.is_terminal:
        return
    leaf.is_terminal = True
    text = engine.prefix_text(tree.prefix(leaf))  # the solution as the policy wrote it
    (verdict,) = await engine.verify([OutcomeItem(text, tree.problem.answer or "")])
    leaf.final_answer = verdict.answer
    if verdict.status.decided:
        leaf.add_rollouts(1, int(verdict.status is Status.VALID))
    leaf.verdicts.append(verdict.to_row())
