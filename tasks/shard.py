"""One shard end to end, as plain async code: every problem's tree advances in one event loop, and the
outputs come back as contract tables. The Prefect task in `flows/` is a thin wrapper around this."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from storage.schema import to_table
from tasks.labels import step_rows
from tasks.problem import Problem
from tasks.search.engine import Engine
from tasks.search.registry import ALGORITHMS


@dataclass
class ShardResult:
    tables: dict[str, pa.Table]
    stats: dict[str, Any] = field(default_factory=dict)


async def run_shard(problems: Sequence[Problem], engine: Engine, search_cfg: Any,
                    on_problem_done: Callable[[], None] | None = None) -> ShardResult:
    run_problem = ALGORITHMS[search_cfg.algorithm]

    async def one(problem: Problem):
        out = await run_problem(engine, problem, search_cfg)
        if on_problem_done is not None:
            on_problem_done()
        return out

    results = await asyncio.gather(*(one(p) for p in problems))
    node_rows: list[dict] = []
    steps: list[dict] = []
    pairs: list[dict] = []
    for res in results:
        tree, leaves = res[0], res[1]
        node_rows += tree.to_rows()
        steps += step_rows(tree, leaves, engine.fmt, label_source=search_cfg.algorithm)
        if len(res) > 2:
            pairs += res[2]
    tables = {
        "problems": to_table("problems", [p.to_row() for p in problems]),
        "nodes": to_table("nodes", node_rows),
        "steps": to_table("steps", steps),
        "pairs": to_table("pairs", pairs),
    }
    s = engine.stats
    stats = {
        "problems": len(problems),
        "nodes": tables["nodes"].num_rows,
        "steps": tables["steps"].num_rows,
        "pairs": tables["pairs"].num_rows,
        "steps_positive": sum(1 for r in steps if r["mc_c"] > 0),
        "policy_requests": s.policy_requests,
        "rollouts": s.samples,
        "generated_steps": s.generated_steps,
        "cache_hits": s.cache_hits,
        "verifications": s.verifications,
        "undecided_verdicts": s.undecided_verdicts,
    }
    return ShardResult(tables, stats)
