"""One shard end to end, as plain async code: every problem's tree advances in one event loop, and the
outputs come back as contract tables. The Prefect task in `flows/` is a thin wrapper around this.

Phases, each over all problems of the shard at once: probe (if the algorithm's budgeting is on), allocate
the search budget from the probes, search + pair making per problem. Allocation needs every probe, and
doing it between two barriers keeps the data independent of scheduling order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from storage.schema import to_table
from tasks import budget as budgeting
from tasks.labels import step_rows
from tasks.pairs import dedupe, make_pairs
from tasks.problem import Problem
from tasks.search.engine import Engine
from tasks.search.registry import ALGORITHMS
from tasks.search.tree import Tree
from tasks.step_checks import StepVerifiers


@dataclass
class ShardResult:
    tables: dict[str, pa.Table]
    stats: dict[str, Any] = field(default_factory=dict)


async def _all_or_cancel(coros: Sequence[Any]) -> list[Any]:
    """`asyncio.gather`, except that the first failure cancels the others and waits for them: a shard that
    fails leaves no tree running into the event loop's shutdown (where asyncio reports it as noise)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_shard(problems: Sequence[Problem], engine: Engine, search_cfg: Any,
                    on_problem_done: Callable[[], None] | None = None,
                    step_verifiers: StepVerifiers | None = None) -> ShardResult:
    """`step_verifiers`: the step checks and the judge, run on each problem's solutions as soon as its search
    ends (None: none; `steps.verdicts` stays empty)."""
    algo = ALGORITHMS[search_cfg.algorithm]
    trees = [Tree(p, search_cfg.algorithm, engine.policy.policy_id) for p in problems]
    budget_cfg = getattr(search_cfg, "budget", None)
    skipped: dict[str, int] = {r: 0 for r in budgeting.SKIP_REASONS}
    if budget_cfg is not None and budget_cfg.enabled:
        async def probe_one(problem: Problem):
            engine.begin_chain(0)  # probes depend on nothing (request-depth measurement only)
            return await budgeting.probe(engine, problem, budget_cfg)

        probes = await _all_or_cancel([probe_one(p) for p in problems])
        for tree, st in zip(trees, probes):
            # The probe is evidence of MC(root) like any other rollouts: kept, never thresholded.
            tree.root.add_rollouts(st.k, st.c)
            tree.root.estimates.append(("probe", budget_cfg.probe_n))
            tree.root.verdicts.append(st.summary_verdict(engine.verifier.name, engine.verifier.version))
        # The algorithm's default rollouts per problem, so the probe's cost comes out of the shard's budget
        # (None: no fixed per-problem budget, e.g. Math-Shepherd).
        per_problem = getattr(algo, "budget_rollouts", None)
        scales = budgeting.allocate([budgeting.Probe(st.k, st.c) for st in probes], budget_cfg,
                                    per_problem(search_cfg) if per_problem is not None else None)
        for st in probes:
            reason = budgeting.skip_reason(budgeting.Probe(st.k, st.c))
            if reason is not None:
                skipped[reason] += 1
    else:
        scales = [1.0] * len(problems)

    probed = budget_cfg is not None and budget_cfg.enabled

    q_fn = getattr(algo, "q_values", None)

    async def one(problem: Problem, tree: Tree, scale: float | None):
        # One dependency chain per tree (measurement only); after the probe barrier it starts one deeper.
        engine.begin_chain(1 if probed else 0)
        if scale is None:  # skipped: the tree is the root with its probe evidence
            out = (tree, [], [])
        else:
            res = await algo.run_problem(engine, problem, search_cfg, tree=tree, scale=scale)
            pairs_cfg = getattr(search_cfg, "pairs", None)
            pairs = await make_pairs(engine, res.tree, res.leaves, pairs_cfg) if pairs_cfg is not None else []
            rows = step_rows(res.tree, res.leaves, engine.fmt, label_source=search_cfg.algorithm,
                             q_values=(lambda path, reach: q_fn(search_cfg, path, reach)) if q_fn is not None
                             else None)
            if step_verifiers is not None:
                # Per problem, while other trees still search: judge requests overlap their rollouts.
                await step_verifiers.annotate(problem.question, rows)
            out = (res.tree, rows, pairs)
        if on_problem_done is not None:
            on_problem_done()
        return out

    results = await _all_or_cancel([one(p, t, s) for p, t, s in zip(problems, trees, scales)])
    node_rows: list[dict] = []
    steps: list[dict] = []
    pairs: list[dict] = []
    for tree, tree_steps, tree_pairs in results:
        node_rows += tree.to_rows()
        steps += tree_steps
        pairs += tree_pairs
    pairs = dedupe(pairs)
    tables = {
        "problems": to_table("problems", [p.to_row() for p in problems]),
        "nodes": to_table("nodes", node_rows),
        "steps": to_table("steps", steps),
        "pairs": to_table("pairs", pairs),
    }
    s = engine.stats
    pairs_by_kind: dict[str, int] = {}
    for row in pairs:
        pairs_by_kind[row["kind"]] = pairs_by_kind.get(row["kind"], 0) + 1
    stats = {
        "problems": len(problems),
        "searched": sum(sc is not None for sc in scales),
        "skipped": skipped,
        "nodes": tables["nodes"].num_rows,
        "steps": tables["steps"].num_rows,
        "pairs": tables["pairs"].num_rows,
        "pairs_by_kind": pairs_by_kind,
        "steps_positive": sum(1 for r in steps if r["mc_c"] > 0),
        # OmegaPRM estimates only the binary search's probes; the other steps of a path carry k = 0.
        "steps_unestimated": sum(1 for r in steps if r["mc_k"] == 0),
        "policy_requests": s.policy_requests,
        "rollouts": s.samples,
        "generated_steps": s.generated_steps,
        "cache_hits": s.cache_hits,
        "memo_hits": s.memo_hits,
        "verifications": s.verifications,
        "undecided_verdicts": s.undecided_verdicts,
        # Step verifiers: "<verifier>/<status>" -> steps, "judge-solutions/<status>" -> solutions judged.
        "step_verdicts": dict(step_verifiers.counts) if step_verifiers is not None else {},
    }
    return ShardResult(tables, stats)
