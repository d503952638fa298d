"""Math-Shepherd Monte Carlo estimation (Wang et al., 2024): sample M solutions; from every step prefix
draw N completions; store k = N and c = completions reaching the gold answer. Rollouts count as visits, so
a node's Q = value_sum / visits is its c / k. Hard label (any correct)
and soft label (c / N) are derived at export time, never here."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem
from tasks.search.engine import Engine
from tasks.search.evaluate import count_visits, estimate, estimate_adaptive, mark_terminal
from tasks.search.tree import Node, SearchResult, Tree

ALGORITHM = "math-shepherd"


class MathShepherdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["math-shepherd"] = "math-shepherd"
    num_solutions: int = Field(4, ge=1, description="M: solutions sampled per problem, each labelled step by step.")
    k: int = Field(16, ge=1, description="N: completions drawn from every step prefix (one request with n = N).")
    adaptive: bool = Field(
        False, description="Adaptive Monte Carlo for hard labels: draw each step prefix's completions in chunks of "
        "`adaptive_chunk` (one request each) and stop at the first chunk with a correct one, up to N. A hard label "
        "('any completion correct') needs no more; prefixes none of whose completions is correct still get N. "
        "The stored c/k is then not a soft label (sampling stopped at a success): keep this off for soft labels.")
    adaptive_chunk: int = Field(4, ge=1, description="Completions per chunk with `adaptive` on.")
    probe: bool = Field(True, description="Also draw N completions from the bare question: V(root) for advantages.")


async def estimate_node(engine: Engine, tree: Tree, node: Node, k: int, chunk: int | None = None) -> None:
    """k rollouts from the node's prefix, or with `chunk` adaptive ones (stop at the first correct chunk)."""
    if chunk is None:
        await estimate(engine, tree, node, k, as_visits=True)
    else:
        stats = await estimate_adaptive(engine, tree, node, k, chunk)
        count_visits(node, stats.k, stats.c)


async def run_problem(engine: Engine, problem: Problem, cfg: MathShepherdConfig, *, tree: Tree | None = None,
                      scale: float = 1.0) -> SearchResult:
    tree = tree or Tree(problem, ALGORITHM, engine.policy.policy_id)
    num_solutions = max(1, round(cfg.num_solutions * scale))
    # The probe needs no solution, so it goes out with the solutions request (the first round of requests is
    # then as wide as the later ones, and the last one narrower). Nothing else writes the root meanwhile, so
    # the tree is the same. Other coroutines are made only once they are awaited below: one made before a
    # failing `await` would be dropped unawaited ("coroutine ... was never awaited" at shutdown).
    probe = asyncio.ensure_future(estimate(engine, tree, tree.root, cfg.k, as_visits=True)) if cfg.probe else None
    try:
        solutions = await engine.complete(problem, [], num_solutions, purpose="solution")
    except BaseException:
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        raise
    jobs: list = [probe] if probe is not None else []
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
        jobs.append(mark_terminal(engine, tree, leaf, as_visits=True))
    for nid, node in pending.items():
        if nid not in unique_leaves:
            jobs.append(estimate_node(engine, tree, node, cfg.k, cfg.adaptive_chunk if cfg.adaptive else None))
    await asyncio.gather(*jobs)
    return SearchResult(tree, leaves)
