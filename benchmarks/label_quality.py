"""Label quality against the oracle of the synthetic domain, for Math-Shepherd MC, OmegaPRM and MCTS at
several rollout budgets.

Four parts, because four questions are asked:

1. **First-error prediction on one fixed solution set** (the ProcessBench protocol). M full solutions per
   problem are sampled once from the simulated policy (build seed, purpose `solution`: the very solutions
   Math-Shepherd labels in a build) and every algorithm predicts the first error of exactly those:
   - Math-Shepherd: k rollouts from every prefix; predicted first error = first step from which no rollout
     (of that prefix or a longer prefix of the set) reached the answer, i.e. `steps.first_error_index`.
     Adaptive (`search.adaptive`): the same, rollouts drawn in chunks that stop at the first correct one.
   - OmegaPRM: its `binary_search` over each wrong-answer solution, MC(mid) from k rollouts (estimates of a
     shared prefix made once); right-answer solutions are predicted error-free.
   - MCTS: its normal search (every problem, no probe), then each fixed prefix is read from the tree
     (Q / rollout statistics of the node and its subtree, `labels.reaches_answer`); prefixes the tree never
     reached are evaluated with MCTS's own leaf evaluator (k rollouts), and those rollouts are counted.
   Every method verifies each solution's final answer (one outcome check, no rollout). ProcessBench F1 =
   harmonic mean of the accuracy on erroneous solutions (predicted first error == the oracle's) and on
   error-free ones (no error predicted); step accuracy = step i predicted good iff it precedes the
   predicted first error, against the oracle. Rollouts = policy samples spent labelling the set (the M
   solutions themselves are not counted: they are the same for every method).
2. **Each algorithm's normal run** (probe/skip budgeting where the algorithm has it on): pairs, pairs per
   1,000 rollouts, pair precision (chosen step correct and rejected step wrong per the oracle), and, for
   reference only, F1 on the solutions the algorithm labelled itself (not comparable across algorithms:
   OmegaPRM's paths end at the error its search located, so its "acc err" is 1 by construction).

3. **Consensus under label noise**: the simulated policy with recovery and lucky answers at three levels
   (none, moderate, high); one fixed solution set per level; first-error opinions of MC (hard =
   `first_error_index`, per-step `c > 0`, soft = the first step whose c/k halves), the simulated LLM judge
   (verifiers/judge.py), the arithmetic step check (verifiers/arith_check.py), and the consensus rules of
   `storage/consensus.py` over them. F1 (as in part 1) is computed **on the solutions each method keeps**,
   with the share kept and the share of kept solutions whose first error is the oracle's.

4. **Long chains**: part 1's fixed-set comparison on problems of exactly L steps (8, 16, 32; `source.min_steps` =
   `max_steps` = L) at step error rates 0.03 and 0.1: the rollouts (and generated steps) OmegaPRM and MCTS need
   to reach Math-Shepherd's score at N = 16, per L; does OmegaPRM's binary search pay off as chains get longer?
   Score = F1, or the accuracy on wrong solutions where no solution is right (F1 undefined).

Runs in-process (no Prefect), no rollout cache, so every number is a fresh computation.

    .venv/bin/python benchmarks/label_quality.py            # the tables + benchmarks/label_quality.png
    .venv/bin/python benchmarks/label_quality.py --parts 3  # consensus only (+ label_quality_consensus.png)
    .venv/bin/python benchmarks/label_quality.py --parts 4  # long chains (+ label_quality_long.png), ~6 min
    .venv/bin/python benchmarks/label_quality.py --quick    # fewer problems and budgets (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage.render import Segment  # noqa: E402
from tasks.budget import BudgetConfig  # noqa: E402
from tasks.labels import reaches_answer  # noqa: E402
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig  # noqa: E402
from tasks.problem import Problem  # noqa: E402
from tasks.prompt import PromptConfig  # noqa: E402
from tasks.search import mcts  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.search.evaluate import estimate, estimate_adaptive, mark_terminal  # noqa: E402
from tasks.search.math_shepherd import MathShepherdConfig  # noqa: E402
from tasks.search.mcts import MCTSConfig  # noqa: E402
from tasks.search.omegaprm import OmegaPRMConfig, binary_search  # noqa: E402
from tasks.search.tree import Node, Tree  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import (SyntheticSourceConfig, first_error, load_synthetic, masked_error,  # noqa: E402
                                     oracle_labels, parse_question)
from storage.consensus import Opinion, agreement, decide, first_error_opinion  # noqa: E402
from storage.exports.labels import SOFT_DROP as SOFT_DROP_EXPORT, soft_drop_first_error  # noqa: E402
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig  # noqa: E402

FIXED_METHODS = ("math-shepherd", "math-shepherd-adaptive", "omegaprm", "mcts")
ADAPTIVE_CHUNK = 4  # adaptive MC draws rollouts in chunks of this size, stopping at the first correct one


def make_engine(error_rate: float, seed: int, noise: tuple[float, float] = (0.0, 0.0)) -> Engine:
    """An engine over the simulated policy; `noise` = (recovery_rate, lucky_rate)."""
    prompt = PromptConfig()
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=error_rate, recovery_rate=noise[0],
                                                   lucky_rate=noise[1]), prompt.step_format)
    return Engine(policy, OutcomeVerifier(OutcomeVerifierConfig()), prompt, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# Part 1: one fixed solution set, every method predicts its first errors


@dataclass
class FixedSet:
    """M solutions per problem (duplicates within a problem dropped), with the oracle's first errors."""

    problems: list[Problem]
    solutions: dict[str, list[list[Segment]]]  # problem_id -> solutions (steps, with the text the policy wrote)
    truth: dict[str, list[int | None]] = field(default_factory=dict)

    def items(self):
        for p in self.problems:
            for j, steps in enumerate(self.solutions[p.problem_id]):
                yield p, j, steps


async def sample_fixed_set(problems: Sequence[Problem], m: int, error_rate: float, seed: int,
                           noise: tuple[float, float] = (0.0, 0.0)) -> FixedSet:
    engine = make_engine(error_rate, seed, noise)
    try:
        # Purpose `solution` and the build seed: the same solutions Math-Shepherd itself would label.
        outs = await asyncio.gather(*(engine.complete(p, [], m, purpose="solution") for p in problems))
    finally:
        await engine.verifier.aclose()
    sols: dict[str, list[list[Segment]]] = {}
    truth: dict[str, list[int | None]] = {}
    for p, sol in zip(problems, outs):
        uniq: dict[tuple[str, ...], list[Segment]] = {}
        for s in sol:
            if s:
                uniq.setdefault(texts(s), s)
        sols[p.problem_id] = list(uniq.values())
        spec = parse_question(p.question)[0]
        truth[p.problem_id] = [first_error(spec, t) for t in uniq]
    return FixedSet(list(problems), sols, truth)


def texts(solution: Sequence[Segment]) -> tuple[str, ...]:
    """A solution's steps as stored (what the oracle reads)."""
    return tuple(s.text for s in solution)


def _path_first_error(path: Sequence[Node], reach: dict[str, bool | None]) -> int | None:
    # The labeller's rule (tasks/labels.py): first step from which nothing reached the answer.
    return next((i for i, n in enumerate(path) if reach[n.node_id] is False), None)


async def _terminals(engine: Engine, tree: Tree, paths: Sequence[list[Node]]) -> None:
    # Every method checks each solution's own final answer once (an outcome verification, no rollout).
    await asyncio.gather(*(mark_terminal(engine, tree, path[-1]) for path in {id(p[-1]): p for p in paths}.values()))


async def predict_math_shepherd(engine: Engine, problem: Problem, sols: list[list[Segment]], k: int,
                                chunk: int | None = None) -> list[int | None]:
    """`chunk`: adaptive MC (`search.adaptive`), rollouts in chunks stopping at the first correct one."""
    tree = Tree(problem, "math-shepherd", engine.policy.policy_id)
    paths = [tree.add_path(s) for s in sols]
    leaves = {p[-1].node_id for p in paths}
    prefixes = {n.node_id: n for p in paths for n in p[:-1] if n.node_id not in leaves}
    one = (lambda n: estimate(engine, tree, n, k)) if chunk is None else (lambda n: estimate_adaptive(engine, tree, n, k, chunk))
    await asyncio.gather(_terminals(engine, tree, paths), *(one(n) for n in prefixes.values()))
    reach = reaches_answer(tree)
    return [_path_first_error(p, reach) for p in paths]


async def predict_omegaprm(engine: Engine, problem: Problem, sols: list[list[Segment]], k: int) -> list[int | None]:
    tree = Tree(problem, "omegaprm", engine.policy.policy_id)
    paths = [tree.add_path(s) for s in sols]
    await _terminals(engine, tree, paths)
    memo: dict[str, asyncio.Task] = {}

    async def mc(node: Node) -> float | None:
        # One estimate per prefix node, shared by every solution through it (as OmegaPRM's search does).
        if node.node_id not in memo:
            memo[node.node_id] = asyncio.ensure_future(estimate(engine, tree, node, k))
        return (await memo[node.node_id]).mc

    async def one(path: list[Node]) -> int | None:
        leaf = path[-1]
        if not leaf.rollouts or leaf.rollouts_correct:
            return None  # right answer (or undecided): no search, predicted error-free
        # The empty prefix is the question, not a step, so the first error lies in [0, m-1].
        e, _ = await binary_search(len(path), lambda i: mc(path[i]))
        return e

    return list(await asyncio.gather(*(one(p) for p in paths)))


async def predict_mcts(engine: Engine, problem: Problem, sols: list[list[Segment]], cfg: MCTSConfig) -> tuple[list[int | None], int, int]:
    """(predictions, fixed prefixes the search had evidence for, fixed prefixes in all)."""
    res = await mcts.run_problem(engine, problem, cfg)
    tree = res.tree
    paths = [tree.extend(tree.root, s) for s in sols]
    leaves = {p[-1].node_id for p in paths}
    # Coverage before the set's own outcome checks add evidence: what the search itself knows.
    reach0 = reaches_answer(tree)
    prefixes = {n.node_id: n for p in paths for n in p[:-1] if n.node_id not in leaves}
    gaps = [n for nid, n in prefixes.items() if reach0[nid] is None]
    await asyncio.gather(_terminals(engine, tree, paths), *(estimate(engine, tree, n, cfg.k) for n in gaps))
    reach = reaches_answer(tree)
    return [_path_first_error(p, reach) for p in paths], len(prefixes) - len(gaps), len(prefixes)


async def label_fixed_set(fixed: FixedSet, method: str, setting: int, error_rate: float, seed: int) -> dict[str, Any]:
    """Predict every fixed solution's first error with one method; setting = k (Math-Shepherd, OmegaPRM) or
    MCTS iterations. A fresh engine without cache: every sample is counted."""
    engine = make_engine(error_rate, seed)
    covered = total = 0
    try:
        async def one(p: Problem) -> list[int | None]:
            nonlocal covered, total
            sols = fixed.solutions[p.problem_id]
            if method == "math-shepherd":
                return await predict_math_shepherd(engine, p, sols, setting)
            if method == "math-shepherd-adaptive":
                return await predict_math_shepherd(engine, p, sols, setting, ADAPTIVE_CHUNK)
            if method == "omegaprm":
                return await predict_omegaprm(engine, p, sols, setting)
            preds, cov, tot = await predict_mcts(engine, p, sols, MCTSConfig(iterations=setting))
            covered, total = covered + cov, total + tot
            return preds

        preds = await asyncio.gather(*(one(p) for p in fixed.problems))
    finally:
        await engine.verifier.aclose()
    out = score_fixed(fixed, dict(zip([p.problem_id for p in fixed.problems], preds)))
    s = engine.stats
    labelled = max(1, out["steps"])
    out.update(rollouts=s.samples, calls_per_step=s.policy_requests / labelled,
               gen_per_step=s.generated_steps / labelled,
               coverage=covered / total if total else float("nan"))
    return out


def f1_of(acc_err: float, acc_ok: float) -> float:
    return 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0


def score_fixed(fixed: FixedSet, preds: dict[str, list[int | None]]) -> dict[str, Any]:
    err_hit = err_n = ok_hit = ok_n = step_hit = step_n = 0
    for p in fixed.problems:
        spec = parse_question(p.question)[0]
        for steps, truth, pred in zip(fixed.solutions[p.problem_id], fixed.truth[p.problem_id], preds[p.problem_id]):
            if truth is None:
                ok_n += 1
                ok_hit += pred is None
            else:
                err_n += 1
                err_hit += pred == truth
            for i, good in enumerate(oracle_labels(spec, texts(steps))):
                step_n += 1
                step_hit += (pred is None or i < pred) == good
    acc_err = err_hit / err_n if err_n else float("nan")
    acc_ok = ok_hit / ok_n if ok_n else float("nan")
    return {"solutions": err_n + ok_n, "erroneous": err_n, "acc_err": acc_err, "acc_ok": acc_ok,
            "f1": f1_of(acc_err, acc_ok), "step_acc": step_hit / max(1, step_n), "steps": step_n}


def fixed_grid(quick: bool) -> list[tuple[str, int]]:
    ks = [1, 2, 4, 8, 16] if quick else [1, 2, 4, 8, 16, 32, 64]
    iters = [8, 32] if quick else [8, 16, 32, 64]
    return ([("math-shepherd", k) for k in ks[1:]] + [("math-shepherd-adaptive", k) for k in ks[2:]]
            + [("omegaprm", k) for k in ks]
            + [("mcts", i) for i in iters])


def fixed_label(method: str, setting: int) -> str:
    if method == "mcts":
        return f"iters={setting} (k=4)"
    if method == "math-shepherd-adaptive":
        return f"N<={setting}, chunks of {ADAPTIVE_CHUNK}"
    return f"N={setting}" if method == "math-shepherd" else f"k={setting}"


# ---------------------------------------------------------------------------------------------------------
# Part 2: each algorithm's own run, for pairs


def grid(quick: bool) -> list[tuple[str, str, Any, BudgetConfig | None]]:
    ms = [4, 16] if quick else [4, 16, 64]
    om = [50, 200] if quick else [50, 200, 800]
    mc = [8, 32] if quick else [8, 32, 64]
    probed = BudgetConfig(enabled=True, reallocate=False)
    return ([("math-shepherd", f"N={n}", MathShepherdConfig(k=n), None) for n in ms]
            # Behind the same probe-and-skip budgeting as OmegaPRM and MCTS: pairs from the same problems.
            + [("math-shepherd+probe", "N=16", MathShepherdConfig(k=16), probed)]
            + [("omegaprm", f"k=16 budget={b}", OmegaPRMConfig(rollout_budget=b, num_searches=max(20, b // 10)),
                None) for b in om]
            + [("mcts", f"iters={i}", MCTSConfig(iterations=i), None) for i in mc])


def score(problems, tables, stats) -> dict[str, float]:
    """Pairs of a normal run, and (reference only) F1 on the run's own labelled solutions."""
    specs = {p.problem_id: parse_question(p.question)[0] for p in problems}
    by_sol: dict[str, list[dict]] = defaultdict(list)
    for r in tables["steps"].to_pylist():
        by_sol[r["solution_id"]].append(r)
    err_hit = err_n = ok_hit = ok_n = 0
    for rows in by_sol.values():
        rows.sort(key=lambda r: r["step_index"])
        truth = first_error(specs[rows[0]["problem_id"]], [r["step_text"] for r in rows])
        pred = rows[0]["first_error_index"]
        if truth is None:
            ok_n, ok_hit = ok_n + 1, ok_hit + (pred is None)
        else:
            err_n, err_hit = err_n + 1, err_hit + (pred == truth)
    pairs = tables["pairs"].to_pylist()
    good_pairs = 0
    for p in pairs:
        spec = specs[p["problem_id"]]
        prefix = list(p["prefix_steps"])
        c_ok = oracle_labels(spec, prefix + [p["chosen"]])[-1]
        r_ok = oracle_labels(spec, prefix + [p["rejected"]])[-1]
        good_pairs += c_ok and not r_ok
    own_f1 = f1_of(err_hit / err_n if err_n else float("nan"), ok_hit / ok_n if ok_n else float("nan"))
    return {
        "rollouts": stats.rollouts, "solutions": len(by_sol), "own_f1": own_f1,
        "pairs": len(pairs), "pairs_per_1k": 1000 * len(pairs) / max(1, stats.rollouts),
        "pair_precision": good_pairs / len(pairs) if pairs else float("nan"),
        "pairs_by_kind": stats.pairs_by_kind, "skipped": sum(stats.skipped.values()),
    }


async def run_one(problems, cfg, error_rate: float, seed: int, budget: BudgetConfig | None = None):
    engine = make_engine(error_rate, seed)
    try:
        return await run_shard(problems, engine, cfg, budget=budget)
    finally:
        await engine.verifier.aclose()


def interpolate_rollouts(curve: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """Rollouts at which a (rollouts, F1) curve, sorted by rollouts, first reaches `target` (linear between
    measured points), and whether that is an interpolation (False: already reached at the first point, so
    only an upper bound); None if never reached."""
    prev = None
    for x, y in curve:
        if y >= target:
            if prev is None:
                return x, False
            (x0, y0) = prev
            return x0 + (target - y0) * (x - x0) / (y - y0), True
        prev = (x, y)
    return None


def ratio_line(fixed_results: list[tuple[str, int, dict]], ref_k: int = 16) -> str:
    """OmegaPRM's rollouts for Math-Shepherd's F1 at N = ref_k on the fixed set, as a ratio."""
    ms = next((m for a, s, m in fixed_results if a == "math-shepherd" and s == ref_k), None)
    curve = sorted((m["rollouts"], m["f1"]) for a, _, m in fixed_results if a == "omegaprm")
    if ms is None or not curve:
        return "ratio: not measured (no Math-Shepherd N=16 or OmegaPRM row)"
    head = f"OmegaPRM vs Math-Shepherd N={ref_k} on the fixed set (F1 {ms['f1']:.3f}, {ms['rollouts']} rollouts): "
    found = interpolate_rollouts(curve, ms["f1"])
    if found is None:
        return head + f"not reached within {curve[-1][0]} rollouts (ratio > {curve[-1][0] / ms['rollouts']:.2f})"
    need, interpolated = found
    return head + (f"~{need:.0f} rollouts, ratio {need / ms['rollouts']:.2f}" if interpolated
                   else f"<= {need:.0f} rollouts, ratio <= {need / ms['rollouts']:.2f}")


# ---------------------------------------------------------------------------------------------------------
# Part 3: consensus under label noise (recovery, lucky answers), on one fixed solution set per noise level

# (recovery_rate, lucky_rate) of the simulated policy.
# "high" leaves about a third of the wrong solutions ending on the gold answer (ProcessBench finds many
# right-answer solutions with a wrong step, most of all on its hardest split).
NOISE_LEVELS: dict[str, tuple[float, float]] = {"none": (0.0, 0.0), "moderate": (0.05, 0.05), "high": (0.15, 0.1)}
# mc-hard: `first_error_index` (reach-propagated, what the exports label by default); mc-per-step: each step's own
# c > 0; mc-soft: the exports' `step_labels=soft-drop` (see `soft_first_error`). Rules use mc-hard as MC's
# opinion, except the rows that name another MC rule in brackets.
CONSENSUS_METHODS = ("mc-hard", "mc-per-step", "mc-soft", "judge", "check", "mc-and-judge",
                     "mc-and-judge (per-step MC)", "mc-and-judge (soft-drop MC)", "mc-and-check", "majority",
                     "majority (soft-drop MC)")
SOFT_DROP = SOFT_DROP_EXPORT  # one rule: the export's `soft-drop` (storage/exports/labels.py)
# Analysis only (part 3's sweep, no extra rollouts): other hard rules over the same c/k values.
SWEEP_THRESHOLDS = (0.0, 0.0625, 0.125, 0.25)
SWEEP_DROPS = (0.3, 0.5, 0.7)


def soft_first_error(values: Sequence[float | None], fallback: Opinion = None) -> Opinion:
    """MC soft (`step_labels=soft-drop`): the first step whose c/k falls below SOFT_DROP of the c/k of the prefix
    before it (values[0] is the question's own c/k). An absolute threshold on c/k cannot work here: a correct
    early step of a long chain has small c/k because later steps go wrong, so the soft signal is the drop a
    step causes (the PAV-style advantage), not the level."""
    return soft_drop_first_error(list(values[1:]), values[0], fallback)


def _drop_rule(values: Sequence[float], ratio: float) -> Opinion:
    return next((i - 1 for i in range(1, len(values)) if values[i] < ratio * values[i - 1]), -1)


def _threshold_rule(values: Sequence[float], tau: float) -> Opinion:
    return next((i for i, v in enumerate(values[1:]) if v <= tau), -1)


async def mc_opinions(engine: Engine, problem: Problem, sols: list[list[Segment]], k: int
                      ) -> tuple[list[Opinion], list[Opinion], list[Opinion], list[list[float]]]:
    """(hard, soft, per-step, c/k values) for each fixed solution: hard = `first_error_index` (reach-propagated,
    what the exports label by default), soft = `soft_first_error` over each prefix's own c/k, per-step = the
    first step none of whose own rollouts reached the answer; values = [the question's c/k, each step's]."""
    tree = Tree(problem, "math-shepherd", engine.policy.policy_id)
    paths = [tree.add_path(s) for s in sols]
    leaves = {p[-1].node_id for p in paths}
    prefixes = {n.node_id: n for p in paths for n in p[:-1] if n.node_id not in leaves}
    await asyncio.gather(_terminals(engine, tree, paths), estimate(engine, tree, tree.root, k),
                         *(estimate(engine, tree, n, k) for n in prefixes.values()))
    reach = reaches_answer(tree)
    hard = [_path_first_error(p, reach) for p in paths]
    values = [[tree.root.mc] + [n.mc for n in p] for p in paths]
    soft = [soft_first_error(v, h) for v, h in zip(values, hard)]
    per_step = [next((i for i, n in enumerate(p) if n.rollouts and not n.rollouts_correct), -1) for p in paths]
    return [-1 if h is None else h for h in hard], soft, per_step, values


async def judge_opinions(fixed: FixedSet, accuracy: float, seed: int) -> dict[str, list[Opinion]]:
    """The simulated judge (verifiers/judge.py over tasks/policy/simulated_judge.py), spread over the steps
    as a build stores it, then read back as consensus reads it."""
    from tasks.policy.base import GenerationRequest, SamplingParams
    from tasks.policy.simulated_judge import SimulatedJudge, SimulatedJudgeConfig
    from tasks.prompt import load_template
    from verifiers.base import SolutionItem
    from verifiers.judge import JudgeConfig, JudgeVerifier, step_verdicts

    def request(prompt: str, n: int, temperature: float, max_tokens: int, s: int) -> GenerationRequest:
        return GenerationRequest(prompt, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=s))

    judge = JudgeVerifier(JudgeConfig(), SimulatedJudge(SimulatedJudgeConfig(accuracy=accuracy)),
                          load_template("judge-first-error"), request, build_seed=seed)
    out: dict[str, list[Opinion]] = {}
    for p in fixed.problems:
        sols = fixed.solutions[p.problem_id]
        verdicts = await judge.verify([SolutionItem(p.question, texts(s)) for s in sols])
        out[p.problem_id] = [first_error_opinion([v.status.value for v in step_verdicts(v, len(s))])
                             for v, s in zip(verdicts, sols)]
    return out


def check_opinions(fixed: FixedSet) -> dict[str, list[Opinion]]:
    """The arithmetic step check (verifiers/arith_check.py) on every step: first `invalid` step."""
    from verifiers.arith_check import ArithCheck

    check = ArithCheck()
    return {p.problem_id: [first_error_opinion([check.check(step.text).status.value for step in s])
                           for s in fixed.solutions[p.problem_id]] for p in fixed.problems}


def method_prediction(method: str, ops: dict[str, Opinion]) -> tuple[bool, Opinion]:
    """(kept, predicted first error) of one solution under a method; single sources keep what they decided."""
    if method in ("mc-hard", "mc-per-step", "mc-soft", "judge", "check"):
        key = {"mc-hard": "mc", "mc-soft": "mc-soft", "mc-per-step": "mc-step"}.get(method, method)
        return ops.get(key) is not None, ops.get(key)
    if method == "mc-and-judge (per-step MC)":
        d = decide("mc-and-judge", {"mc": ops["mc-step"], "judge": ops["judge"]})
        return d.keep, d.first_error
    if method.endswith("(soft-drop MC)"):
        rule = method.split(" ")[0]
        d = decide(rule, {"mc": ops["mc-soft"], **{k: v for k, v in ops.items() if k in ("judge", "check")}})
        return d.keep, d.first_error
    d = decide(method, {k: v for k, v in ops.items() if k in ("mc", "judge", "check")})
    return d.keep, d.first_error


def score_kept(fixed: FixedSet, preds: dict[str, list[tuple[bool, Opinion]]]) -> dict[str, Any]:
    """ProcessBench F1 on the solutions a method keeps (its predictions there), and the share it keeps."""
    err_hit = err_n = ok_hit = ok_n = total = 0  # kept_accuracy: share of kept solutions whose first error is the oracle's
    for p in fixed.problems:
        for truth, (kept, pred) in zip(fixed.truth[p.problem_id], preds[p.problem_id]):
            total += 1
            if not kept:
                continue
            if truth is None:
                ok_n, ok_hit = ok_n + 1, ok_hit + (pred == -1)
            else:
                err_n, err_hit = err_n + 1, err_hit + (pred == truth)
    acc_err = err_hit / err_n if err_n else float("nan")
    acc_ok = ok_hit / ok_n if ok_n else float("nan")
    return {"f1": f1_of(acc_err, acc_ok), "acc_err": acc_err, "acc_ok": acc_ok, "kept": err_n + ok_n,
            "kept_accuracy": (err_hit + ok_hit) / max(1, err_n + ok_n),
            "kept_share": (err_n + ok_n) / max(1, total), "kept_erroneous": err_n, "total": total}


async def consensus_level(problems: Sequence[Problem], m: int, k: int, error_rate: float, seed: int,
                          noise: tuple[float, float], judge_accuracy: float) -> dict[str, Any]:
    """Every consensus method on one fixed set sampled from a policy with `noise`."""
    fixed = await sample_fixed_set(problems, m, error_rate, seed, noise)
    engine = make_engine(error_rate, seed, noise)
    try:
        mc = await asyncio.gather(*(mc_opinions(engine, p, fixed.solutions[p.problem_id], k) for p in fixed.problems))
    finally:
        await engine.verifier.aclose()
    judge = await judge_opinions(fixed, judge_accuracy, seed)
    check = check_opinions(fixed)
    ops = {p.problem_id: [{"mc": h, "mc-soft": s, "mc-step": st, "judge": j, "check": c}
                          for h, s, st, j, c in zip(hard, soft, step, judge[p.problem_id], check[p.problem_id])]
           for p, (hard, soft, step, _) in zip(fixed.problems, mc)}
    masked = sum(masked_error(parse_question(p.question)[0], texts(s)) is not None for p, _, s in fixed.items())
    results = {}
    for method in CONSENSUS_METHODS:
        preds = {pid: [method_prediction(method, o) for o in rows] for pid, rows in ops.items()}
        results[method] = score_kept(fixed, preds)
    values = {p.problem_id: v for p, (*_, v) in zip(fixed.problems, mc)}
    analysis = disagreement_analysis(fixed, ops, values)
    rows = [o for rows in ops.values() for o in rows]
    truth_rows = [{"oracle": -1 if t is None else t} for ts in fixed.truth.values() for t in ts]
    agree = agreement([{**o, **t} for o, t in zip(rows, truth_rows)], ("oracle", "mc", "judge", "check"))
    return {"results": results, "masked": masked, "solutions": len(rows),
            "erroneous": sum(t is not None for ts in fixed.truth.values() for t in ts), "agreement": agree,
            "rollouts": engine.stats.samples, "analysis": analysis}


def _relation(pred: Opinion, truth: int | None) -> str:
    """Where an opinion puts a solution's first error relative to the oracle's."""
    if truth is None:
        return "right" if pred == -1 else "false alarm"
    if pred == truth:
        return "exact"
    return "none" if pred == -1 else ("late" if pred > truth else "early")


def disagreement_analysis(fixed: FixedSet, ops: dict[str, list[dict[str, Opinion]]],
                          values: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Why `mc-and-judge` keeps what it keeps: each source's first error against the oracle on the wrong
    solutions (split by masked kind: the solution itself ended on the gold answer by recovery or luck), what
    the kept wrong solutions are, and a sweep of other hard MC rules over the same c/k values."""
    where: dict[str, Counter] = {"mc-hard": Counter(), "mc-soft": Counter(), "judge": Counter()}
    kept_wrong: dict[str, Counter] = {"mc-hard": Counter(), "mc-soft": Counter()}
    for p in fixed.problems:
        spec = parse_question(p.question)[0]
        for steps, truth, o in zip(fixed.solutions[p.problem_id], fixed.truth[p.problem_id], ops[p.problem_id]):
            if truth is None:
                continue
            kind = masked_error(spec, texts(steps)) or "answer wrong"
            for name, key in (("mc-hard", "mc"), ("mc-soft", "mc-soft"), ("judge", "judge")):
                where[name][(kind, _relation(o[key], truth))] += 1
            for name, key in (("mc-hard", "mc"), ("mc-soft", "mc-soft")):
                if o[key] is not None and o[key] == o["judge"]:
                    what = "right" if o[key] == truth else ("both say -1" if o[key] == -1 else "both name another step")
                    kept_wrong[name][(kind, what)] += 1
    sweep = []
    rules = ([(f"c/k > {t:g} (per-step)", lambda v, t=t: _threshold_rule(v, t)) for t in SWEEP_THRESHOLDS]
             + [(f"drop below {r:g} x before", lambda v, r=r: _drop_rule(v, r)) for r in SWEEP_DROPS])
    for label, rule in rules:
        alone: dict[str, list[tuple[bool, Opinion]]] = {}
        both: dict[str, list[tuple[bool, Opinion]]] = {}
        for pid, rows in ops.items():
            preds = [rule(v) for v in values[pid]]
            alone[pid] = [(True, m) for m in preds]
            both[pid] = [(m == o["judge"], m) for m, o in zip(preds, rows)]
        sweep.append((label, score_kept(fixed, alone), score_kept(fixed, both)))
    return {"where": where, "kept_wrong": kept_wrong, "sweep": sweep}


def consensus_part(problems: Sequence[Problem], args) -> dict[tuple[int, str], dict[str, Any]]:
    ks = [int(k) for k in str(args.consensus_k).split(",")]
    levels = {(k, name): asyncio.run(consensus_level(problems, args.solutions, k, args.consensus_error_rate, args.seed,
                                                     noise, args.judge_accuracy))
              for k in ks for name, noise in NOISE_LEVELS.items()}
    print(f"\n## 3. consensus under label noise: step_error_rate={args.consensus_error_rate}, M={args.solutions}, "
          f"simulated judge accuracy={args.judge_accuracy}, arithmetic step check (verifiers/arith_check.py)")
    print("noise levels (recovery_rate, lucky_rate): " + ", ".join(f"{n} {v}" for n, v in NOISE_LEVELS.items()))
    cols = ["N", "noise", "method", "F1 on kept", "acc err", "acc ok", "kept = oracle", "kept", "kept share"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for (k, name), lv in levels.items():
        for method, r in lv["results"].items():
            print(f"| {k} | {name} | {method} | {r['f1']:.3f} | {r['acc_err']:.3f} | {r['acc_ok']:.3f} | "
                  f"{r['kept_accuracy']:.3f} | {r['kept']}/{r['total']} | {r['kept_share']:.2f} |")
    print("\nper level: solutions (erroneous; masked = wrong solutions ending on the gold answer); first-error "
          "agreement with the oracle and between sources, where both are decided")
    for (k, name), lv in levels.items():
        pairs = "; ".join(f"{a['a']}~{a['b']} {a['rate']:.2f}" for a in lv["agreement"] if a["rate"] is not None)
        print(f"- N={k} {name}: {lv['solutions']} ({lv['erroneous']} erroneous, {lv['masked']} masked); {pairs}")
    for k in ks:
        hi = levels[(k, "high")]["results"]
        mc_best = max(hi[m]["f1"] for m in ("mc-hard", "mc-per-step", "mc-soft"))
        for method in ("mc-and-judge", "mc-and-judge (soft-drop MC)"):
            mj = hi[method]
            ok = mj["f1"] > mc_best and mj["f1"] > hi["judge"]["f1"] and mj["kept_share"] >= 0.3
            print(f"N={k}, high noise: {method} F1 {mj['f1']:.3f} keeping {mj['kept_share']:.0%} vs MC alone (best "
                  f"of hard, per-step, soft) {mc_best:.3f} and the judge alone {hi['judge']['f1']:.3f}: beats both "
                  f"keeping >= 30 %: {'yes' if ok else 'NO'}")
    for k in ks:
        an = levels[(k, "high")]["analysis"]
        print(f"\n### N={k}, high noise: first error of each source on the wrong solutions, against the oracle")
        print("(masked kind: `recovered`/`lucky` = the solution itself ends on the gold answer)")
        print("| source | masked kind | exact | late | early | none (-1) |\n|---|---|---|---|---|---|")
        for name, c in an["where"].items():
            for kind in ("answer wrong", "recovered", "lucky"):
                row = [c[(kind, r)] for r in ("exact", "late", "early", "none")]
                if sum(row):
                    print(f"| {name} | {kind} | " + " | ".join(map(str, row)) + " |")
        print("\nwrong solutions kept by mc-and-judge (MC and the judge name the same first error):")
        for name, c in an["kept_wrong"].items():
            print(f"- MC {name}: " + "; ".join(f"{n} {kind} {what}" for (kind, what), n in sorted(c.items())))
        print(f"\nsweep of MC hard rules over the same c/k (N={k}, high noise; analysis, no extra rollouts):")
        print("| MC rule | F1 alone | mc-and-judge F1 | acc err | acc ok | kept |\n|---|---|---|---|---|---|")
        for label, alone, both in an["sweep"]:
            print(f"| {label} | {alone['f1']:.3f} | {both['f1']:.3f} | {both['acc_err']:.3f} | {both['acc_ok']:.3f} | "
                  f"{both['kept_share']:.0%} |")
    return levels


def _plot_consensus(levels: dict[tuple[int, str], dict[str, Any]], path: str) -> None:
    """One panel per (N, noise level): F1 on the kept solutions against the share kept, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for k, _ in levels})
    names = list(NOISE_LEVELS)
    fig, axes = plt.subplots(len(ks), len(names), figsize=(4.2 * len(names), 3.8 * len(ks)), sharey=True,
                             squeeze=False)
    for row, k in zip(axes, ks):
        for ax, name in zip(row, names):
            for method, r in levels[(k, name)]["results"].items():
                soft = "soft-drop" in method or method == "mc-soft"
                ax.scatter(r["kept_share"], r["f1"], s=40, marker="^" if soft else "o")
                ax.annotate(method, (r["kept_share"], r["f1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_title(f"noise {name} {NOISE_LEVELS[name]}, N={k}", fontsize=9)
            ax.set_xlabel("share of solutions kept")
            ax.set_xlim(0, 1.05)
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("first-error F1 on kept solutions")
    fig.suptitle("Consensus filtering under label noise (recovery, lucky answers); triangles: soft-drop MC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Part 4: long chains. Part 1's fixed-set comparison on problems of exactly L steps (`source.min_steps` =
# `max_steps` = L): how many rollouts OmegaPRM and MCTS need to reach Math-Shepherd's F1, per L.

LONG_MS = (2, 4, 8, 16, 32)
LONG_OMEGA = (1, 2, 4, 8, 16, 32, 64)
LONG_MCTS = (2, 4, 8, 16, 32)
LONG_REF_K = 16  # Math-Shepherd's N whose score the others must reach


def long_grid() -> list[tuple[str, int]]:
    return ([("math-shepherd", k) for k in LONG_MS] + [("omegaprm", k) for k in LONG_OMEGA]
            + [("mcts", i) for i in LONG_MCTS])


def rollouts_to_reach(results: list[tuple[str, int, dict]], method: str, target: float, metric: str,
                      key: str = "rollouts") -> tuple[float, bool] | None:
    """`key` (rollouts or generated steps) at which `method`'s `metric` curve first reaches `target`."""
    curve = sorted((m[key], m[metric]) for a, _, m in results if a == method)
    return interpolate_rollouts(curve, target)


def long_chains_part(args) -> dict[tuple[float, int], list[tuple[str, int, dict]]]:
    lengths = [int(x) for x in str(args.long_steps).split(",")]
    rates = [float(x) for x in str(args.long_error_rate).split(",")]
    out: dict[tuple[float, int], list[tuple[str, int, dict]]] = {}
    print(f"\n## 4. long chains: {args.long_problems} problems of exactly L steps per L, M={args.solutions}, "
          f"step_error_rate {rates} (x1.5 per step: difficulty saturates from 8 steps on), seed={args.seed}")
    for rate in rates:
        for length in lengths:
            problems = load_synthetic(SyntheticSourceConfig(num_problems=args.long_problems, seed=args.seed,
                                                            min_steps=length, max_steps=length)).problems
            fixed = asyncio.run(sample_fixed_set(problems, args.solutions, rate, args.seed))
            res = []
            for a, setting in long_grid():
                m = asyncio.run(label_fixed_set(fixed, a, setting, rate, args.seed))
                m["generated"] = round(m["gen_per_step"] * m["steps"])
                # F1 needs both kinds of solution; where every solution is wrong, the accuracy on them.
                m["score"] = m["f1"] if m["erroneous"] < m["solutions"] and m["erroneous"] else m["acc_err"]
                res.append((a, setting, m))
            out[(rate, length)] = res
            first = res[0][2]
            metric = "F1" if first["erroneous"] < first["solutions"] else "acc err (no right solution: F1 undefined)"
            print(f"\n### step_error_rate {rate}, L = {length}: {first['solutions']} solutions ({first['erroneous']} "
                  f"erroneous, {first['steps']} steps); score = {metric}")
            print("| method | setting | rollouts | generated steps | score | F1 | acc err | acc ok | step acc |\n"
                  "|---|---|---|---|---|---|---|---|---|")
            for a, setting, m in res:
                print(f"| {a} | {fixed_label(a, setting)} | {m['rollouts']} | {m['generated']} | {m['score']:.3f} | "
                      f"{m['f1']:.3f} | {m['acc_err']:.3f} | {m['acc_ok']:.3f} | {m['step_acc']:.3f} |")
    print(f"\n### rollouts to reach Math-Shepherd's score at N={LONG_REF_K}, per chain length. Ratios: to "
          f"Math-Shepherd's rollouts at N={LONG_REF_K}, and to the fewest with which Math-Shepherd itself reaches that "
          "score (interpolated between its N); '<=' = reached at the smallest setting tried (an upper bound)")
    print("| step error rate | L | Math-Shepherd N=16: score, rollouts (generated steps) | Math-Shepherd: fewest "
          "rollouts reaching it | OmegaPRM: rollouts, ratios | OmegaPRM: generated steps, ratio to N=16 | "
          "MCTS: rollouts, ratios | MCTS: generated steps, ratio to N=16 |\n|---|---|---|---|---|---|---|---|")

    def fmt(got: tuple[float, bool] | None) -> str:
        return "-" if got is None else f"{'' if got[1] else '<= '}{got[0]:.0f}"

    for (rate, length), res in out.items():
        ms = next(m for a, s_, m in res if a == "math-shepherd" and s_ == LONG_REF_K)
        own = rollouts_to_reach(res, "math-shepherd", ms["score"], "score")
        cells = [fmt(own)]
        for method in ("omegaprm", "mcts"):
            for key in ("rollouts", "generated"):
                got = rollouts_to_reach(res, method, ms["score"], "score", key)
                if got is None:
                    top = max(m[key] for a, _, m in res if a == method)
                    best = max(m["score"] for a, _, m in res if a == method)
                    cells.append(f"not reached within {top} (best {best:.3f}; > {top / ms[key]:.2f})")
                    continue
                need, interp = got
                le = "" if interp else "<= "
                cell = f"{le}{need:.0f}, {le}{need / ms[key]:.2f}"
                if key == "rollouts" and own is not None:
                    cell += f" / {le}{need / own[0]:.2f}" + ("" if own[1] else " (MS bound)")
                cells.append(cell)
        print(f"| {rate} | {length} | {ms['score']:.3f}, {ms['rollouts']} ({ms['generated']}) | " + " | ".join(cells) + " |")
    return out


def _plot_long(out: dict[tuple[float, int], list[tuple[str, int, dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r for r, _ in out})
    lengths = sorted({n for _, n in out})
    fig, axes = plt.subplots(len(rates), len(lengths), figsize=(4.2 * len(lengths), 3.6 * len(rates)), squeeze=False)
    for row, rate in zip(axes, rates):
        for ax, length in zip(row, lengths):
            res = out[(rate, length)]
            for method in ("math-shepherd", "omegaprm", "mcts"):
                pts = sorted((m["rollouts"], m["score"]) for a, _, m in res if a == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ms = next(m for a, s_, m in res if a == "math-shepherd" and s_ == LONG_REF_K)
            ax.axhline(ms["score"], color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            all_wrong = res[0][2]["erroneous"] == res[0][2]["solutions"]
            ax.set_title(f"step error rate {rate}, L = {length}" + (" (acc err)" if all_wrong else ""), fontsize=9)
            ax.set_xlabel("rollouts spent labelling the fixed set")
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("first-error F1")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Long chains: dashed = Math-Shepherd at N={LONG_REF_K}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adaptive_line(fixed_results: list[tuple[str, int, dict]]) -> str:
    """Rollouts adaptive MC saves against full-N Math-Shepherd at the same N, and the F1 of each."""
    full = {s: m for a, s, m in fixed_results if a == "math-shepherd"}
    parts = []
    for a, s, m in fixed_results:
        if a == "math-shepherd-adaptive" and s in full:
            f = full[s]
            parts.append(f"N={s}: {m['rollouts']} vs {f['rollouts']} rollouts ({1 - m['rollouts'] / f['rollouts']:.0%} "
                         f"saved), F1 {m['f1']:.3f} vs {f['f1']:.3f}")
    return "adaptive MC vs full N (same N): " + ("; ".join(parts) if parts else "not measured")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--solutions", type=int, default=4, help="M: fixed solutions sampled per problem")
    ap.add_argument("--error-rate", type=float, default=0.3, help="simulated policy step_error_rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "label_quality.png"))
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated: 1, 2, 3, 4)")
    ap.add_argument("--consensus-k", default="4,16", help="part 3: MC rollouts per prefix (comma-separated list)")
    ap.add_argument("--consensus-error-rate", type=float, default=0.1,
                    help="part 3: step_error_rate (0.1: the default build's)")
    ap.add_argument("--judge-accuracy", type=float, default=0.8, help="part 3: the simulated judge's accuracy")
    ap.add_argument("--consensus-plot", default=str(REPO / "benchmarks" / "label_quality_consensus.png"))
    ap.add_argument("--long-steps", default="8,16,32", help="part 4: chain lengths L (comma-separated)")
    ap.add_argument("--long-problems", type=int, default=16, help="part 4: problems per chain length")
    ap.add_argument("--long-error-rate", default="0.03,0.1",
                    help="part 4: step_error_rate(s), comma-separated (x1.5 per step at these lengths); 0.03 leaves "
                    "about a quarter of 32-step solutions right, 0.1 almost none")
    ap.add_argument("--long-plot", default=str(REPO / "benchmarks" / "label_quality_long.png"))
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    n_problems = 24 if args.quick and args.problems == 64 else args.problems
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n_problems, seed=args.seed)).problems
    t0 = time.time()
    print(f"# label quality: {n_problems} synthetic problems, seed={args.seed}")
    if "1" in parts or "2" in parts:
        fixed_part(problems, args, parts)
    if "3" in parts:
        levels = consensus_part(problems, args)
        _plot_consensus(levels, args.consensus_plot)
        print(f"plot: {args.consensus_plot}")
    if "4" in parts:
        long_out = long_chains_part(args)
        _plot_long(long_out, args.long_plot)
        print(f"plot: {args.long_plot}")
    print(f"\n{time.time() - t0:.1f} s")
    print("reproduce: .venv/bin/python benchmarks/label_quality.py " + " ".join(sys.argv[1:]))


def fixed_part(problems: Sequence[Problem], args, parts: set[str]) -> None:
    """Parts 1 and 2 (no noise): every algorithm on one fixed set, and each algorithm's normal run."""
    n_problems = len(problems)

    fixed = asyncio.run(sample_fixed_set(problems, args.solutions, args.error_rate, args.seed))
    fixed_results = [(a, s, asyncio.run(label_fixed_set(fixed, a, s, args.error_rate, args.seed)))
                     for a, s in fixed_grid(args.quick)]
    first = fixed_results[0][2]
    print(f"parts 1-2: {n_problems} problems, step_error_rate={args.error_rate}")
    print(f"\n## 1. first-error prediction on one fixed set: {first['solutions']} solutions "
          f"({first['erroneous']} erroneous, {first['steps']} steps), M={args.solutions} per problem")
    cols = ["method", "setting", "rollouts", "F1", "acc err", "acc ok", "step acc", "calls/step", "gen/step",
            "tree coverage"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for a, s, m in fixed_results:
        cov = f"{m['coverage']:.2f}" if a == "mcts" else "-"
        print(f"| {a} | {fixed_label(a, s)} | {m['rollouts']} | {m['f1']:.3f} | {m['acc_err']:.3f} | "
              f"{m['acc_ok']:.3f} | {m['step_acc']:.3f} | {m['calls_per_step']:.2f} | {m['gen_per_step']:.1f} | {cov} |")
    print(ratio_line(fixed_results))
    print(adaptive_line(fixed_results))
    _plot(fixed_results, args.plot)
    print(f"plot: {args.plot}")
    if "2" not in parts:
        return
    results = []
    for algo, label, cfg, budget in grid(args.quick):
        res = asyncio.run(run_one(problems, cfg, args.error_rate, args.seed, budget))
        results.append((algo, label, score(problems, res.tables, res.stats)))
    print("\n## 2. pairs from each algorithm's normal run")
    cols = ["algorithm", "budget", "rollouts", "pairs (by kind)", "pairs/1k", "pair prec", "skipped",
            "own-solutions F1 (not comparable)"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for algo, label, m in results:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(m["pairs_by_kind"].items()))
        print(f"| {algo} | {label} | {m['rollouts']} | {m['pairs']} ({kinds}) | {m['pairs_per_1k']:.1f} | "
              f"{m['pair_precision']:.3f} | {m['skipped']} | {m['own_f1']:.3f} on {m['solutions']} |")


def _plot(fixed_results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in FIXED_METHODS:
        pts = sorted((m["rollouts"], m["f1"]) for a, _, m in fixed_results if a == algo)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
    ax.set_xscale("log")
    ax.set_xlabel("rollouts spent labelling the fixed set")
    ax.set_ylabel("first-error F1 (ProcessBench-style)")
    ax.set_title("Label quality vs rollouts, one fixed solution set")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
