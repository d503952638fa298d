"""One shard end to end, as plain async code: every problem's tree advances in one event loop, and the
outputs come back as contract tables. The Prefect task in `flows/` is a thin wrapper around this.

Phases, each over all problems of the shard at once: probe (if budgeting is on), allocate the search
budget from the probes, search + pair making per problem. Allocation needs every probe, and doing it
between two barriers keeps the data independent of scheduling order. The algorithm is reached only
through its registry record (`tasks/search/registry.py`); budgeting and pair making are configured once for
every algorithm."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from storage.schema import RowBatches, to_table
from tasks import budget as budgeting
from tasks.budget import BudgetConfig
from tasks.collector import old_objects_set_aside
from tasks.formal import FormalLabeller
from tasks.labels import step_rows
from tasks.pairs import PairsConfig, dedupe, make_pairs
from tasks.pairs import formal as formal_pairs
from tasks.problem import Problem
from tasks.pseudo_gold import PseudoGoldConfig, pseudo_gold as vote_reference, with_reference
from tasks.search.engine import Engine
from tasks.search.registry import SearchAlgorithm, get_algorithm
from tasks.search.tree import Tree
from tasks.stats import BuildStats, step_profile
from tasks.step_checks import StepVerifiers


@dataclass
class ShardResult:
    tables: dict[str, pa.Table]
    stats: BuildStats = field(default_factory=BuildStats)


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


async def _probe_all(problems: Sequence[Problem], trees: Sequence[Tree], engine: Engine, algo: SearchAlgorithm,
                     search_cfg: Any, cfg: BudgetConfig) -> tuple[list[float | None], dict[str, int]]:
    """Probe every problem, keep the probes as evidence of MC(root), and allocate: (scale or None, skipped)."""

    async def probe_one(problem: Problem):
        engine.begin_chain(0)  # probes depend on nothing (request-depth measurement only)
        return await budgeting.probe(engine, problem, cfg)

    probes = await _all_or_cancel([probe_one(p) for p in problems])
    skipped = {r: 0 for r in budgeting.SKIP_REASONS}
    for tree, st in zip(trees, probes):
        # The probe is evidence of MC(root) like any other rollouts: kept, never thresholded.
        tree.root.add_rollouts(st.k, st.c)
        tree.root.estimates.append(("probe", cfg.probe_n))
        tree.root.verdicts.append(st.summary_verdict(engine.verifier.name, engine.verifier.version))
        reason = budgeting.skip_reason(budgeting.Probe(st.k, st.c))
        if reason is not None:
            skipped[reason] += 1
    # The algorithm's default rollouts per problem, so the probe's cost comes out of the shard's budget.
    scales = budgeting.allocate([budgeting.Probe(st.k, st.c) for st in probes], cfg, algo.budget_rollouts(search_cfg))
    return scales, skipped


SKIP_NO_REFERENCE = "no_reference"  # pseudo-gold found no clear majority answer: nothing to label against


async def _vote_references(problems: Sequence[Problem], engine: Engine,
                           cfg: PseudoGoldConfig) -> tuple[list[Problem], dict[str, float]]:
    """Problems without a gold answer get the majority answer of `cfg.samples` solutions as their reference
    (`tasks/pseudo_gold.py`), recorded in their metadata; the vote counters for `BuildStats.pseudo_gold`."""

    async def one(problem: Problem) -> Problem:
        if problem.answer is not None:
            return problem
        engine.begin_chain(0)  # the vote depends on nothing (request-depth measurement only)
        return with_reference(problem, await vote_reference(engine, problem, cfg))

    voted = await _all_or_cancel([one(p) for p in problems])
    counts: dict[str, float] = {}
    for before, p in zip(problems, voted):
        if before.answer is not None:
            continue
        vote = p.metadata["pseudo_gold"]
        key = "voted" if vote["answer"] is not None else "unresolved"
        counts[key] = counts.get(key, 0) + 1
        counts["share_sum"] = counts.get("share_sum", 0.0) + vote["share"]
    return voted, counts


async def run_shard(problems: Sequence[Problem], engine: Engine, search_cfg: Any, *,
                    budget: BudgetConfig | None = None, pairs: PairsConfig | None = None,
                    on_problem_done: Callable[[], None] | None = None,
                    step_verifiers: StepVerifiers | None = None, formal: FormalLabeller | None = None,
                    pseudo_gold: PseudoGoldConfig | None = None) -> ShardResult:
    """`budget` / `pairs`: the build's sections of the same names (defaults when None). `step_verifiers`: the
    step checks and the judge, run on each problem's solutions as soon as its search ends (None: none;
    `steps.verdicts` stays empty). `formal`: Lean checks each solution of the problem whole, after the step
    verifiers (its verdicts join theirs in `steps.verdicts`; None: `steps.formal_label` stays null).
    `pseudo_gold`: problems without a gold answer first get a voted reference (None or disabled: they are
    searched without one); one whose vote finds no clear majority is not searched (skip reason
    `no_reference`) but stays in the `problems` table with its vote."""
    with old_objects_set_aside():
        return await _run_shard(problems, engine, search_cfg, budget=budget, pairs=pairs,
                                on_problem_done=on_problem_done, step_verifiers=step_verifiers, formal=formal,
                                pseudo_gold=pseudo_gold)


async def _run_shard(problems: Sequence[Problem], engine: Engine, search_cfg: Any, *, budget: BudgetConfig | None,
                     pairs: PairsConfig | None, on_problem_done: Callable[[], None] | None,
                     step_verifiers: StepVerifiers | None, formal: FormalLabeller | None,
                     pseudo_gold: PseudoGoldConfig | None) -> ShardResult:
    algo = get_algorithm(search_cfg.algorithm)
    budget = budget or BudgetConfig()
    pairs_cfg = pairs or PairsConfig()
    votes: dict[str, float] = {}
    if pseudo_gold is not None and pseudo_gold.enabled and any(p.answer is None for p in problems):
        problems, votes = await _vote_references(problems, engine, pseudo_gold)
    no_reference = [p.answer is None and "pseudo_gold" in p.metadata for p in problems]
    trees = [Tree(p, algo.name, engine.policy.policy_id) for p in problems]
    probed = budget.active(algo.budget_by_default)
    searchable = [i for i, skip in enumerate(no_reference) if not skip]
    scales: list[float | None] = [None] * len(problems)
    skipped = {r: 0 for r in budgeting.SKIP_REASONS}
    if probed and searchable:
        found, skipped = await _probe_all([problems[i] for i in searchable], [trees[i] for i in searchable], engine,
                                          algo, search_cfg, budget)
        for i, scale in zip(searchable, found):
            scales[i] = scale
    elif not probed:
        for i in searchable:
            scales[i] = 1.0
    if any(no_reference):
        skipped[SKIP_NO_REFERENCE] = sum(no_reference)

    # The problems table is built by the first tree to finish, while the others wait on their requests: built
    # here, it delayed every first request by its conversion (a millisecond per ~100 problems).
    problems_table: list[pa.Table] = []
    batches = {name: RowBatches(name) for name in ("nodes", "steps", "pairs")}

    async def one(problem: Problem, tree: Tree, scale: float | None) -> tuple[list[dict], list[dict], list[dict]]:
        # One dependency chain per tree (measurement only); after the probe barrier it starts one deeper.
        engine.begin_chain(1 if probed else 0)
        if scale is None:  # skipped: the tree is the root with its probe evidence
            rows: list[dict] = []
            made: list[dict] = []
        else:
            res = await algo.run_problem(engine, problem, search_cfg, tree=tree, scale=scale)
            tree = res.tree
            made = await make_pairs(engine, res.tree, res.leaves, pairs_cfg, reward_scaled=algo.reward_scaled)
            rows = step_rows(res.tree, res.leaves, engine.fmt, label_source=algo.name,
                             q_values=lambda path, reach: algo.q_values(search_cfg, path, reach))
            if step_verifiers is not None:
                # Per problem, while other trees still search: judge requests overlap their rollouts.
                await step_verifiers.annotate(problem.question, rows)
            if formal is not None:
                checks = await formal.annotate(problem, rows)
                if pairs_cfg.formal.enabled:  # Lean-verified sibling pairs need Lean's first errors
                    made += await formal_pairs.make_pairs(engine, res.tree, res.leaves, checks, formal,
                                                          pairs_cfg.formal)
        if not problems_table:
            problems_table.append(to_table("problems", [p.to_row() for p in problems]))
        out = (tree.to_rows(), rows, made)
        # Into Arrow while other trees still wait on their requests (`RowBatches`); the same tables as converting
        # every tree's rows at the end.
        for name, part in zip(("nodes", "steps", "pairs"), out):
            batches[name].add(part)
        if on_problem_done is not None:
            on_problem_done()
        return out

    results = await _all_or_cancel([one(p, t, s) for p, t, s in zip(problems, trees, scales)])
    pair_rows = dedupe(row for *_, made in results for row in made)
    tables = {"problems": problems_table[0] if problems_table else to_table("problems", [])}
    for i, name in enumerate(("nodes", "steps", "pairs")):
        tables[name] = batches[name].table(lambda i=i: (row for res in results for row in res[i]))
    s = engine.stats
    pairs_by_kind: dict[str, int] = {}
    for row in pair_rows:
        pairs_by_kind[row["kind"]] = pairs_by_kind.get(row["kind"], 0) + 1
    stats = step_profile(tables["steps"]) + BuildStats(
        problems=len(problems), searched=sum(sc is not None for sc in scales), skipped=skipped,
        nodes=tables["nodes"].num_rows, pairs=tables["pairs"].num_rows, pairs_by_kind=pairs_by_kind,
        policy_requests=s.policy_requests, rollouts=s.samples, generated_steps=s.generated_steps,
        cache_hits=s.cache_hits, memo_hits=s.memo_hits, verifications=s.verifications,
        undecided_verdicts=s.undecided_verdicts, timeout_verdicts=s.timeout_verdicts,
        verify_batches=s.verify_batches, batched_verdicts=s.batched_verdicts, verify_seconds=s.verify_seconds,
        verify_fast_calls=s.verify_fast_calls, fast_verdicts=s.fast_verdicts,
        step_verdicts={**(dict(step_verifiers.counts) if step_verifiers is not None else {}),
                       **(dict(formal.counts) if formal is not None else {})},
        pseudo_gold=votes)
    return ShardResult(tables, stats)
