"""Math-Shepherd Monte Carlo estimation (Wang et al., 2024): sample M solutions; from every step prefix
draw N completions; store k = N and c = completions reaching the gold answer. Hard label (any correct)
and soft label (c / N) are derived at export time, never here."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree
from verifiers.base import OutcomeItem, Status

ALGORITHM = "math-shepherd"


class MathShepherdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["math-shepherd"] = "math-shepherd"
    num_solutions: int = Field(4, ge=1, description="M: solutions sampled per problem, each labelled step by step.")
    k: int = Field(16, ge=1, description="N: completions drawn from every step prefix (one request with n = N).")
    probe: bool = Field(True, description="Also draw N completions from the bare question: V(root) for advantages.")


async def estimate_node(engine: Engine, tree: Tree, node: Node, k: int) -> None:
    stats = await engine.rollouts(tree.problem, tree.steps(node), k)
    node.add_rollouts(stats.k, stats.c)
    node.visits += stats.k
    node.value_sum += stats.c
    node.verdicts.append(stats.summary_verdict(engine.verifier.name, engine.verifier.version))


async def mark_terminal(engine: Engine, tree: Tree, leaf: Node) -> None:
    """A finished solution is its own single rollout: k = 1, c = whether its answer is right."""
    if leaf.is_terminal:
        return
    leaf.is_terminal = True
    text = engine.fmt.render(tree.steps(leaf))
    (verdict,) = await engine.verify([OutcomeItem(text, tree.problem.answer or "")])
    leaf.final_answer = verdict.detail or None
    if verdict.status.decided:
        c = int(verdict.status is Status.VALID)
        leaf.add_rollouts(1, c)
        leaf.visits += 1
        leaf.value_sum += c
    leaf.verdicts.append(verdict.to_row())


async def run_problem(engine: Engine, problem: Problem, cfg: MathShepherdConfig) -> tuple[Tree, list[Node]]:
    tree = Tree(problem, ALGORITHM, engine.policy.policy_id)
    jobs = []
    if cfg.probe:
        jobs.append(estimate_node(engine, tree, tree.root, cfg.k))
    solutions = await engine.complete(problem, [], cfg.num_solutions, purpose="solution")
    leaves: list[Node] = []
    pending: dict[str, Node] = {}
    for steps in solutions:
        if not steps:
            continue
        path = tree.add_path(steps)
        leaves.append(path[-1])
        for node in path[:-1]:
            pending.setdefault(node.node_id, node)  # shared prefixes are estimated once
    unique_leaves = {leaf.node_id: leaf for leaf in leaves}
    for leaf in unique_leaves.values():
        jobs.append(mark_terminal(engine, tree, leaf))
    for nid, node in pending.items():
        if nid not in unique_leaves:
            jobs.append(estimate_node(engine, tree, node, cfg.k))
    await asyncio.gather(*jobs)
    return tree, leaves
