"""Formal verification inside a shard, on the stand-in REPL (not Lean: only stepforge's own cost is measured,
plus the stand-in's checking, with a fixed per-proof cost standing in for Lean's).

1. labels: one shard of synthetic problems (Math-Shepherd, the simulated policy) with the `formal` section
   off and on: wall time, proofs checked, the formal labels' share of the shard's time, and whether every
   formal label agrees with the oracle's first error;
2. search: the formal domain (`synthetic-lean`, simulated prover, `verifier.kind=lean`) with Math-Shepherd,
   OmegaPRM and MCTS over tactic steps: wall time, whole proofs checked by Lean (rollouts and terminals),
   proofs/s, steps and Lean-verified pairs.

Usage: .venv/bin/python benchmarks/formal_build.py [--problems 32] [--cost-ms 20] [--repls 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.components import load_source, make_formal_labeller, make_policy, make_verifier  # noqa: E402
from flows.config import load_config  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import first_error, parse_question  # noqa: E402


def _shard(sets: list[str]) -> tuple[float, object, list]:
    cfg = load_config(None, sets)

    async def go():
        problems = load_source(cfg).problems
        policy, verifier = make_policy(cfg), make_verifier(cfg)
        engine = Engine(policy, verifier, cfg.prompt, seed=cfg.seed)
        formal = make_formal_labeller(cfg)
        t0 = time.perf_counter()
        try:
            res = await run_shard(problems, engine, cfg.search, budget=cfg.budget, pairs=cfg.pairs, formal=formal)
        finally:
            await verifier.aclose()
            if formal is not None:
                await formal.aclose()
        return time.perf_counter() - t0, res, problems

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--cost-ms", type=float, default=20.0)
    ap.add_argument("--repls", type=int, default=4)
    a = ap.parse_args()
    cmd = json.dumps([sys.executable, "-m", "verifiers.lean.testing.repl_server", "--cost-ms", str(a.cost_ms)])
    lean = [f"command={cmd}", f"max_repls={a.repls}", "max_repl_uses=null"]
    base = [f"source.num_problems={a.problems}", "policy.step_error_rate=0.3", "judge.enabled=false",
            "search.num_solutions=4", "search.k=8", "rollout_cache=false"]
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min); {a.problems} problems, stand-in "
          f"cost {a.cost_ms:g} ms/proof, {a.repls} REPL processes")
    print("\n1. formal labels in a shard (Math-Shepherd, simulated policy)")
    off_s, off, _ = _shard(base)
    on_s, on, problems = _shard(base + ["formal.enabled=true", *(f"formal.lean.{x}" for x in lean)])
    specs = {p.problem_id: parse_question(p.question)[0] for p in problems}
    sols: dict[str, list[dict]] = {}
    for r in on.tables["steps"].to_pylist():
        sols.setdefault(r["solution_id"], []).append(r)
    agree = 0
    for rows in sols.values():
        rows.sort(key=lambda r: r["step_index"])
        fe = first_error(specs[rows[0]["problem_id"]], [r["step_text"] for r in rows])
        n = len(rows)
        agree += [r["formal_label"] for r in rows] == ([True] * n if fe is None else [True] * fe + [False] + [None] * (n - fe - 1))
    proofs = sum(v for k, v in on.stats.step_verdicts.items() if k.startswith("lean-solutions/"))
    print("| formal | shard s | proofs checked | labels = oracle |\n|---|---|---|---|")
    print(f"| off | {off_s:.2f} | 0 | - |")
    print(f"| on | {on_s:.2f} | {proofs} | {agree}/{len(sols)} |")
    print(f"formal labels' share of the shard: {100 * (on_s - off_s) / on_s:.1f} % "
          f"(lower bound {proofs} x {a.cost_ms:g} ms / {a.repls} processes = {proofs * a.cost_ms / 1000 / a.repls:.2f} s)")

    print("\n2. formal search over tactic steps (synthetic-lean, simulated prover, verifier.kind=lean)")
    print("| algorithm | shard s | proofs checked by Lean (rollouts, terminals, labels) | proofs/s | steps | formal pairs |"
          "\n|---|---|---|---|---|---|")
    lean_domain = ["source.kind=synthetic-lean", "policy.kind=simulated-prover", "verifier.kind=lean", "checks=[]",
                   *(f"verifier.lean.{x}" for x in lean)]
    for algorithm in ("math-shepherd", "omegaprm", "mcts"):
        sets = base + lean_domain + [f"search.algorithm={algorithm}", "formal.enabled=true", "pairs.formal.enabled=true",
                                     *(f"formal.lean.{x}" for x in lean)]
        if algorithm != "math-shepherd":
            sets = [s for s in sets if not s.startswith(("search.num_solutions", "search.k"))]
        secs, res, _ = _shard(sets)
        checked = res.stats.verifications + sum(v for k, v in res.stats.step_verdicts.items()
                                                if k.startswith("lean-solutions/"))
        print(f"| {algorithm} | {secs:.2f} | {checked} | {checked / secs:.0f} | {res.tables['steps'].num_rows} | "
              f"{res.stats.pairs_by_kind.get('formal', 0)} |")
    print(f"\ncommand: .venv/bin/python benchmarks/formal_build.py --problems {a.problems} --cost-ms {a.cost_ms:g} "
          f"--repls {a.repls}")


if __name__ == "__main__":
    main()
