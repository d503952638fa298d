"""Throughput of the shard scheduler (tasks/search/engine.py) with the simulated policy.

1. Zero latency: generated steps per second through the scheduler (batching, routing, segmentation and
   outcome verification included; the simulated policy itself is cheap Python).
2. Latency L per request, backend concurrency C: achieved requests per second as a fraction of the
   ideal C / L. All trees of a shard submit together, so the backend should stay saturated whenever
   more than C requests are pending.

    .venv/bin/python benchmarks/engine_throughput.py
    .venv/bin/python benchmarks/engine_throughput.py --problems 64 --latency 0.05 --concurrency 8,32,128
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig  # noqa: E402
from tasks.prompt import PromptConfig  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.search.math_shepherd import MathShepherdConfig  # noqa: E402
from tasks.search.mcts import MCTSConfig  # noqa: E402
from tasks.search.omegaprm import OmegaPRMConfig  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic  # noqa: E402
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig  # noqa: E402

MAX_BATCH = 0
ALGOS = {"math-shepherd": lambda: MathShepherdConfig(k=16), "omegaprm": OmegaPRMConfig, "mcts": MCTSConfig}


async def run(problems, algo: str, latency: float, concurrency: int, seed: int) -> dict[str, float]:
    prompt = PromptConfig()
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.3, latency_s=latency, max_concurrency=concurrency,
                                                   max_batch=MAX_BATCH or 256),
                             prompt.step_format)
    verifier = OutcomeVerifier(OutcomeVerifierConfig())
    engine = Engine(policy, verifier, prompt, seed=seed)
    policy_s = 0.0
    sample = policy.sample_n

    def timed(*a, **kw):
        # The simulated policy's sampling is pure CPU: timing it separates the scheduler's own cost.
        nonlocal policy_s
        t = time.perf_counter()
        try:
            return sample(*a, **kw)
        finally:
            policy_s += time.perf_counter() - t

    policy.sample_n = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        await run_shard(problems, engine, ALGOS[algo]())
    finally:
        await verifier.aclose()
    wall = time.perf_counter() - t0
    s = engine.stats
    return {"wall": wall, "requests": s.policy_requests, "steps": s.generated_steps, "batches": engine._gen.batches,
            "policy_s": policy_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05, help="simulated seconds per request (L)")
    ap.add_argument("--concurrency", default="8,32,128", help="backend concurrency values C")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    problems = load_synthetic(SyntheticSourceConfig(num_problems=args.problems, seed=args.seed)).problems

    print(f"# engine throughput: {args.problems} synthetic problems per shard, simulated policy")
    print("\n## zero latency")
    print("| algorithm | requests | batches | generated steps | wall s | steps/s | simulated-policy CPU s | "
          "steps/s excl. policy CPU |")
    print("|---|---|---|---|---|---|---|---|")
    cpu_floor: dict[str, float] = {}
    for algo in ALGOS:
        r = asyncio.run(run(problems, algo, 0.0, 64, args.seed))
        cpu_floor[algo] = r["wall"]
        rest = max(1e-9, r["wall"] - r["policy_s"])
        print(f"| {algo} | {r['requests']} | {r['batches']} | {r['steps']} | {r['wall']:.2f} | "
              f"{r['steps'] / r['wall']:,.0f} | {r['policy_s']:.2f} | {r['steps'] / rest:,.0f} |")

    print(f"\n## latency L = {args.latency} s per request, concurrency C")
    print("| algorithm | C | requests | mean requests per batch | wall s | achieved req/s | ideal C/L | "
          "fraction of ideal | bound: requests / (requests*L/C + zero-latency wall) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in [int(x) for x in args.concurrency.split(",")]:
        for algo in ALGOS:
            r = asyncio.run(run(problems, algo, args.latency, c, args.seed))
            achieved = r["requests"] / r["wall"]
            ideal = c / args.latency
            bound = r["requests"] / (r["requests"] / ideal + cpu_floor[algo])
            print(f"| {algo} | {c} | {r['requests']} | {r['requests'] / r['batches']:.1f} | {r['wall']:.2f} | "
                  f"{achieved:,.0f} | {ideal:,.0f} | "
                  f"{achieved / ideal:.2f} | {bound / ideal:.2f} |")
    print("\nreproduce: .venv/bin/python benchmarks/engine_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
