"""Label quality against the oracle of the synthetic domain, for Math-Shepherd MC, OmegaPRM and MCTS at
several rollout budgets.

Every algorithm labels the solutions it builds itself; the oracle knows each one's first error, so:
- first-error F1 (ProcessBench): harmonic mean of the accuracy on erroneous solutions (predicted first
  error == the oracle's) and on error-free ones (no error predicted). The predicted first error is the
  solution-level `first_error_index` the steps table stores (first step with c = 0).
- step accuracy: step i predicted good iff it precedes the predicted first error, against the oracle.
- policy requests and generated steps per labelled step, rollouts (samples) in total.
- pairs per 1,000 rollouts, and the fraction of pairs whose chosen step is correct and rejected step
  wrong according to the oracle.

Runs in-process (no Prefect), no rollout cache, so every number is a fresh computation.

    .venv/bin/python benchmarks/label_quality.py            # the table + benchmarks/label_quality.png
    .venv/bin/python benchmarks/label_quality.py --quick    # fewer problems and budgets (a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.budget import BudgetConfig  # noqa: E402
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig  # noqa: E402
from tasks.prompt import PromptConfig  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.search.math_shepherd import MathShepherdConfig  # noqa: E402
from tasks.search.mcts import MCTSConfig  # noqa: E402
from tasks.search.omegaprm import OmegaPRMConfig  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, oracle_labels, parse_question  # noqa: E402
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig  # noqa: E402


def grid(quick: bool) -> list[tuple[str, str, Any]]:
    ms = [4, 8, 16] if quick else [4, 8, 16, 32, 64]
    om = [50, 100, 200] if quick else [50, 100, 200, 400, 800]
    mc = [8, 16, 32] if quick else [8, 16, 32, 64]
    # Math-Shepherd twice: labelling every problem (its paper's setting) and behind the same probe-and-skip
    # budgeting as OmegaPRM and MCTS, so that the ratio below compares labels of the same problems.
    probed = BudgetConfig(enabled=True, reallocate=False)
    return ([("math-shepherd", f"N={n}", MathShepherdConfig(k=n)) for n in ms]
            + [("math-shepherd+probe", f"N={n}", MathShepherdConfig(k=n, budget=probed)) for n in ms]
            # Below one k = 16 search, budgets shrink with k (noisier MC, cheaper searches).
            + [("omegaprm", f"k={k} budget={b}", OmegaPRMConfig(k=k, rollout_budget=b)) for k, b in ((4, 16), (8, 32))]
            + [("omegaprm", f"k=16 budget={b}", OmegaPRMConfig(rollout_budget=b, num_searches=max(20, b // 10)))
               for b in om]
            + [("mcts", f"iters={i}", MCTSConfig(iterations=i)) for i in mc])


def score(problems, tables, stats) -> dict[str, float]:
    specs = {p.problem_id: parse_question(p.question)[0] for p in problems}
    by_sol: dict[str, list[dict]] = defaultdict(list)
    for r in tables["steps"].to_pylist():
        by_sol[r["solution_id"]].append(r)
    err_hit = err_n = ok_hit = ok_n = step_hit = step_n = 0
    for rows in by_sol.values():
        rows.sort(key=lambda r: r["step_index"])
        spec = specs[rows[0]["problem_id"]]
        texts = [r["step_text"] for r in rows]
        truth = first_error(spec, texts)
        pred = rows[0]["first_error_index"]
        if truth is None:
            ok_n += 1
            ok_hit += pred is None
        else:
            err_n += 1
            err_hit += pred == truth
        for i, good in enumerate(oracle_labels(spec, texts)):
            step_n += 1
            step_hit += (pred is None or i < pred) == good
    acc_err = err_hit / err_n if err_n else float("nan")
    acc_ok = ok_hit / ok_n if ok_n else float("nan")
    f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    pairs = tables["pairs"].to_pylist()
    good_pairs = chosen_ok = 0
    for p in pairs:
        spec = specs[p["problem_id"]]
        prefix = list(p["prefix_steps"])
        c_ok = oracle_labels(spec, prefix + [p["chosen"]])[-1]
        r_ok = oracle_labels(spec, prefix + [p["rejected"]])[-1]
        chosen_ok += c_ok
        good_pairs += c_ok and not r_ok
    labelled = max(1, step_n)
    return {
        "solutions": len(by_sol), "erroneous": err_n, "acc_err": acc_err, "acc_ok": acc_ok, "f1": f1,
        "step_acc": step_hit / labelled, "rollouts": stats["rollouts"],
        "calls_per_step": stats["policy_requests"] / labelled, "gen_per_step": stats["generated_steps"] / labelled,
        "pairs": len(pairs), "pairs_per_1k": 1000 * len(pairs) / max(1, stats["rollouts"]),
        "pair_precision": good_pairs / len(pairs) if pairs else float("nan"),
        "chosen_correct": chosen_ok / len(pairs) if pairs else float("nan"),
        "skipped": sum(stats["skipped"].values()),
    }


async def run_one(problems, cfg, error_rate: float, seed: int):
    prompt = PromptConfig()
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=error_rate), prompt.step_format)
    verifier = OutcomeVerifier(OutcomeVerifierConfig())
    engine = Engine(policy, verifier, prompt, seed=seed)
    try:
        res = await run_shard(problems, engine, cfg)
    finally:
        await verifier.aclose()
    return res


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--error-rate", type=float, default=0.3, help="simulated policy step_error_rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "label_quality.png"))
    args = ap.parse_args()
    n_problems = 24 if args.quick and args.problems == 64 else args.problems
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n_problems, seed=args.seed)).problems

    results: list[tuple[str, str, dict]] = []
    print(f"running {len(grid(args.quick))} configurations...", file=sys.stderr)
    t0 = time.time()
    for algo, label, cfg in grid(args.quick):
        res = asyncio.run(run_one(problems, cfg, args.error_rate, args.seed))
        results.append((algo, label, score(problems, res.tables, res.stats)))

    cols = ["algorithm", "budget", "rollouts", "solutions", "F1", "acc err", "acc ok", "step acc",
            "calls/step", "gen/step", "pairs", "pairs/1k", "pair prec", "skipped"]
    print(f"# label quality: {n_problems} synthetic problems, step_error_rate={args.error_rate}, seed={args.seed}")
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for algo, label, m in results:
        cells = [algo, label, str(m["rollouts"]), f"{m['solutions']} ({m['erroneous']} err)", f"{m['f1']:.3f}",
                 f"{m['acc_err']:.3f}", f"{m['acc_ok']:.3f}", f"{m['step_acc']:.3f}", f"{m['calls_per_step']:.2f}",
                 f"{m['gen_per_step']:.1f}", str(m["pairs"]), f"{m['pairs_per_1k']:.1f}", f"{m['pair_precision']:.3f}",
                 str(m["skipped"])]
        print("| " + " | ".join(cells) + " |")

    om_curve = sorted((m["rollouts"], m["f1"]) for a, _, m in results if a == "omegaprm")
    for ref in ("math-shepherd", "math-shepherd+probe"):
        ms16 = next((m for a, l, m in results if a == ref and l == "N=16"), None)
        if ms16 is None:
            continue
        found = interpolate_rollouts(om_curve, ms16["f1"])
        head = f"OmegaPRM vs {ref} N=16 (F1 {ms16['f1']:.3f}, {ms16['rollouts']} rollouts): "
        if found is None:
            print(head + f"not reached within {om_curve[-1][0]} rollouts (ratio > {om_curve[-1][0] / ms16['rollouts']:.2f})")
        else:
            need, interpolated = found
            print(head + f"{'~' if interpolated else '<= '}{need:.0f} rollouts, ratio "
                  f"{'' if interpolated else '<= '}{need / ms16['rollouts']:.2f}")
    _plot(results, args.plot)
    print(f"plot: {args.plot}; {time.time() - t0:.1f} s")
    print("reproduce: .venv/bin/python benchmarks/label_quality.py " + " ".join(sys.argv[1:]))


def _plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in ("math-shepherd", "math-shepherd+probe", "omegaprm", "mcts"):
        pts = sorted((m["rollouts"], m["f1"]) for a, _, m in results if a == algo)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
    ax.set_xscale("log")
    ax.set_xlabel("rollouts (policy samples, all problems)")
    ax.set_ylabel("first-error F1 (ProcessBench-style)")
    ax.set_title("Label quality vs budget, synthetic domain")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
