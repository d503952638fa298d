"""OmegaPRM (Luo et al., 2024): divide-and-conquer MCTS for process supervision.

MC(s) is estimated from k rollouts of state s. A wrong rollout from s is binary-searched for its first
error: MC of the prefix up to the midpoint decides the side (recurse left when MC(mid) = 0, right
otherwise), so the first error of an m-step rollout costs about log2(m) estimates instead of m. Every
(state, wrong rollout) with 0 < MC(s) < 1 is a candidate; each search picks the candidate maximising

    Q(s, r) + U(s),  Q = alpha^(1 - MC(s)) * beta^(len(r) / L),  U = c_puct * sqrt(sum N) / (1 + N(s))

(favouring states that are probably right and rollouts that are short and still wrong: likely a
near-miss), and stops after `num_searches` searches or `rollout_budget` rollouts. The tree stores k and c
of every estimated prefix; labels and pairs are read from those, not from a threshold inside the search.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import CrossFieldError
from tasks.policy.base import Completion
from tasks.problem import Problem
from tasks.search.engine import Engine, RolloutStats
from tasks.search.evaluate import estimate, mark_terminal
from tasks.search.tree import Node, SearchResult, Tree

ALGORITHM = "omegaprm"


class OmegaPRMConfig(BaseModel):
    """Defaults from the paper and its public code."""

    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["omegaprm"] = "omegaprm"
    k: int = Field(16, ge=1, description="Rollouts per MC estimate of a state (one request with n = k).")
    c_puct: float = Field(0.125, ge=0.0, description="Exploration weight of U(s).")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="Q = alpha^(1 - MC(s)) * ...: preference for likely-correct states.")
    beta: float = Field(0.9, gt=0.0, le=1.0, description="Q = ... * beta^(len(r) / L): preference for short rollouts.")
    length_scale: int = Field(500, ge=1, description="L: rollout length (tokens) normalising beta's exponent.")
    num_searches: int = Field(20, ge=1, description="Binary searches per problem (at most).")
    rollout_budget: int = Field(200, ge=1, description="Rollouts per problem (at most), estimates of the root included.")
    correct_paths: bool = Field(
        True, description="Also label one correct rollout per search (all steps positive), so the labelled set "
        "holds error-free solutions as well as erroneous ones.")
    parallel_searches: int = Field(
        1, ge=1, description="Binary searches of one problem run at once, on the best candidates in turn "
        "(each later pick sees the earlier ones as visited). 1: the paper's one search at a time. More cut "
        "the chain of dependent requests a tree waits on; the data stays deterministic but differs from 1.")

    @model_validator(mode="after")
    def _budget_covers_one_estimate(self) -> "OmegaPRMConfig":
        # One MC estimate costs k rollouts: a smaller budget could estimate nothing, and raising it in
        # secret would spend more than asked.
        if self.rollout_budget < self.k:
            raise CrossFieldError(f"`search.rollout_budget` ({self.rollout_budget}) must be at least `search.k` "
                                  f"({self.k}): one MC estimate costs k rollouts; raise the budget or lower k.",
                                  "search.rollout_budget", "search.k")
        return self


@dataclass
class Candidate:
    """A state with 0 < MC < 1 and one of its wrong rollouts, not yet searched."""

    state: Node
    rollout: Completion  # segmented only when the candidate is searched: most never are
    tokens: int  # its length in completion tokens
    # Q(s, r) as last computed, with the MC and config it was computed for: every selection scores every
    # candidate, and Q changes only when its state's MC does (two powers per candidate per selection were
    # most of OmegaPRM's selection cost).
    _q_memo: tuple[float, OmegaPRMConfig, float] | None = field(default=None, init=False, repr=False, compare=False)

    def q(self, cfg: OmegaPRMConfig) -> float:
        mc = self.state.mc or 0.0
        got = self._q_memo
        if got is None or got[0] != mc or got[1] is not cfg:
            got = self._q_memo = (mc, cfg, _q(mc, self.tokens, cfg))
        return got[2]


def _q(mc: float, tokens: int, cfg: OmegaPRMConfig) -> float:
    return cfg.alpha ** (1.0 - mc) * cfg.beta ** (tokens / cfg.length_scale)


def score(mc: float, tokens: int, n_state: int, n_total: int, cfg: OmegaPRMConfig) -> float:
    """Q(s, r) + U(s) of a candidate."""
    return _q(mc, tokens, cfg) + cfg.c_puct * math.sqrt(n_total) / (1 + n_state)


def select(candidates: Sequence[Candidate], visits: dict[str, int], cfg: OmegaPRMConfig) -> int:
    """Index of the best candidate; the first wins ties (candidates are kept in a deterministic order). Each
    score is `score(...)` to the bit: the same Q, and U's numerator evaluated once in the same order."""
    explore = cfg.c_puct * math.sqrt(sum(visits.values()))
    best, best_score = 0, -math.inf
    for i, cand in enumerate(candidates):
        s = cand.q(cfg) + explore / (1 + visits.get(cand.state.node_id, 0))
        if s > best_score:
            best, best_score = i, s
    return best


async def binary_search(n_steps: int, mc_of: Callable[[int], Awaitable[float | None]]) -> tuple[int | None, list[int]]:
    """First error of a wrong rollout of `n_steps` steps whose start state has MC > 0.

    `mc_of(i)` is MC of the prefix ending with step i (0-based, inclusive); None means the estimate could
    not be made (budget spent, nothing decided) and aborts the search. The last step is known wrong (the
    answer is), so it is never estimated. Returns (first error index or None if aborted, indices probed)."""
    lo, hi = 0, n_steps - 1  # invariant: the first error lies in [lo, hi]
    probed: list[int] = []
    while lo < hi:
        mid = (lo + hi) // 2
        mc = await mc_of(mid)
        probed.append(mid)
        if mc is None:
            return None, probed
        if mc > 0:
            lo = mid + 1  # something from here still reaches the answer: the error is later
        else:
            hi = mid
    return lo, probed


def _candidates(state: Node, mc: float | None, stats: RolloutStats,
                engine: Engine) -> tuple[list[Candidate], list[Completion]]:
    """(wrong rollouts as candidates if 0 < MC < 1, correct rollouts) of a fresh estimate of `state` (MC `mc`),
    rollouts with at least one step only. Nothing is segmented here."""
    wrong: list[Candidate] = []
    right: list[Completion] = []
    for comp, verdict in zip(stats.completions, stats.verdicts):
        if not verdict.status.decided or not engine.count_steps(comp.text):
            continue
        if verdict.is_valid:
            right.append(comp)
        elif mc is not None and 0 < mc < 1:
            wrong.append(Candidate(state, comp, comp.completion_tokens))
    return wrong, right


def budget_rollouts(cfg: OmegaPRMConfig) -> float:
    """Rollouts one problem may spend at scale 1 (what budgeting shares out, less the probe's)."""
    return float(cfg.rollout_budget)


class _Found:
    """A fresh estimate's candidates, made once the tree's next request is out (`get` from a callback queued
    behind it), or when the wave merges, whichever comes first: the same lists either way."""

    __slots__ = ("_args", "_value")

    def __init__(self, state: Node, stats: RolloutStats, engine: Engine) -> None:
        self._args: tuple | None = (state, state.mc, stats, engine)  # MC as estimated, whenever this runs
        self._value: tuple[list[Candidate], list[Completion]] | None = None

    def get(self) -> tuple[list[Candidate], list[Completion]]:
        if self._value is None:
            self._value = _candidates(*self._args)  # type: ignore[misc]
            self._args = None
        return self._value


@dataclass
class _Account:
    """One search's share of the problem's rollout budget within a wave, and what it evaluated."""

    left: int
    charged: int = 0
    evaluated: list[str] = field(default_factory=list)  # node ids, in this search's own order


async def run_problem(engine: Engine, problem: Problem, cfg: OmegaPRMConfig, *, tree: Tree | None = None,
                      scale: float = 1.0) -> SearchResult:
    """Searches run in waves of up to `parallel_searches`. Every effect of a wave on the search state
    (budget spent, new candidates, labelled leaves, correct paths) is applied after the wave in selection
    order, and each search's budget share is fixed when the wave starts, so the tree never depends on
    which request returns first; with one search per wave this is the paper's sequential loop."""
    tree = tree or Tree(problem, ALGORITHM, engine.policy.policy_id)
    budget = max(cfg.k, round(cfg.rollout_budget * scale))
    searches = max(1, round(cfg.num_searches * scale))
    # Budget is counted in rollouts requested, not generated, so a cache hit never changes the tree.
    spent = 0  # charged against the budget (a node two searches of one wave asked for is charged twice)
    requested = 0  # rollouts really requested: k per estimated node
    correct_from: dict[str, list[Completion]] = {}
    candidates: list[Candidate] = []
    estimated: set[str] = set()  # nodes estimated in finished waves: reused free of charge
    found: dict[str, _Found] = {}  # node id -> its estimate's candidates

    async def run_wave(jobs: list[tuple[_Account, Callable[[Callable[[Node], Awaitable[float | None]]],
                                                           Awaitable[object]]]]) -> list[object]:
        inflight: dict[str, asyncio.Future[float | None]] = {}

        async def estimate_once(node: Node) -> float | None:
            stats = await estimate(engine, tree, node, cfg.k, as_visits=True)  # Q = value_sum / visits = MC
            # The binary search needs only MC: its next request goes out before the candidates are made.
            got = found[node.node_id] = _Found(node, stats, engine)
            asyncio.get_running_loop().call_soon(got.get)
            return node.mc

        def evaluator(acct: _Account) -> Callable[[Node], Awaitable[float | None]]:
            async def evaluate(node: Node) -> float | None:
                if node.node_id in estimated:
                    return node.mc
                if acct.left < cfg.k:
                    return None
                # Charged to every search that asks, even when another search of the wave estimates the
                # node: a share must not depend on which search got there first.
                acct.left -= cfg.k
                acct.charged += cfg.k
                acct.evaluated.append(node.node_id)
                fut = inflight.get(node.node_id)
                if fut is not None:  # another search of this wave estimates the node: its answer is this one's
                    return await asyncio.shield(fut)
                # The first asker estimates in its own step, not in a task of its own: the request goes out now,
                # not a turn of the event loop later, behind every other tree's answer (a hop on each round of
                # the binary search, the critical path).
                fut = inflight[node.node_id] = asyncio.get_running_loop().create_future()
                try:
                    mc = await estimate_once(node)
                except BaseException as exc:
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(exc)
                        fut.exception()  # retrieved: the asker re-raises it, later askers get it from the future
                    raise
                fut.set_result(mc)
                return mc
            return evaluate

        if len(jobs) == 1:  # one search (the paper's loop): no task, no turn of the event loop to start it
            results = [await jobs[0][1](evaluator(jobs[0][0]))]
        else:
            results = await asyncio.gather(*(job(evaluator(acct)) for acct, job in jobs))
        nonlocal spent, requested
        for acct, _ in jobs:  # merge in selection order: candidates keep a deterministic order
            spent += acct.charged
            for node_id in acct.evaluated:
                if node_id not in estimated:
                    estimated.add(node_id)
                    requested += cfg.k
                    wrong, right = found.pop(node_id).get()
                    candidates.extend(wrong)
                    correct_from[node_id] = right
        return list(results)

    async def root_job(evaluate: Callable[[Node], Awaitable[float | None]]) -> object:
        return await evaluate(tree.root)

    await run_wave([(_Account(left=budget), root_job)])
    visits: dict[str, int] = {}
    leaves: list[Node] = []
    done = 0
    while candidates and done < searches and spent + cfg.k <= budget:
        wave: list[tuple[Candidate, list[Node], _Account]] = []
        left = budget - spent
        while candidates and done < searches and left >= cfg.k and len(wave) < cfg.parallel_searches:
            cand = candidates.pop(select(candidates, visits, cfg))
            # A virtual visit: the next pick of the same wave already sees this state as searched.
            visits[cand.state.node_id] = visits.get(cand.state.node_id, 0) + 1
            done += 1
            path = tree.extend(cand.state, engine.segments(cand.rollout))
            need = cfg.k * max(1, math.ceil(math.log2(len(path)))) if len(path) > 1 else 0
            share = min(need, left)
            left -= share
            wave.append((cand, path, _Account(left=share)))
        for _, path, _ in wave:  # the wrong final answers: k = 1, c = 0 (one at a time: leaves may repeat)
            await mark_terminal(engine, tree, path[-1], as_visits=True)

        def search_job(path: list[Node]) -> Callable[[Callable[[Node], Awaitable[float | None]]], Awaitable[object]]:
            async def job(evaluate: Callable[[Node], Awaitable[float | None]]) -> object:
                async def mc_of(i: int) -> float | None:
                    return await evaluate(path[i])

                return await binary_search(len(path), mc_of)
            return job

        outcomes = await run_wave([(acct, search_job(path)) for _, path, acct in wave])
        for (cand, path, _), (e, _) in zip(wave, outcomes):  # type: ignore[misc]
            if e is not None:
                leaves.append(path[e])  # the labelled path ends at the located first error
            if cfg.correct_paths and correct_from.get(cand.state.node_id):
                right = correct_from[cand.state.node_id].pop(0)
                good = tree.extend(cand.state, engine.segments(right))
                await mark_terminal(engine, tree, good[-1], as_visits=True)
                leaves.append(good[-1])
    return SearchResult(tree, leaves, {"searches": done, "search_rollouts": requested, "budget_charged": spent})


__all__ = ["ALGORITHM", "OmegaPRMConfig", "Candidate", "score", "select", "binary_search", "budget_rollouts",
           "run_problem"]
