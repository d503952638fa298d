"""Routing answers as they land vs holding a batch until its slowest request returns.

One shard of 64 synthetic problems through the OpenAI-compatible backend against the stand-in server
(`stepforge serve-policy`'s server, in process, real HTTP on loopback) with latency L·(1 ± jitter): the
same shard run with the scheduler's batch routing (one `generate` call per flush, every tree waits for the
batch) and with per-request routing (what `independent_requests` backends get). Prints wall time and a
hash of the shard's tables, which must be equal: routing changes timing, never data.

    .venv/bin/python benchmarks/engine_routing.py --latency 0.2 --jitter 0.9
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.schema import content_id  # noqa: E402
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig  # noqa: E402
from tasks.testing.standin_server import StandinServer, StandinServerConfig  # noqa: E402
from tasks.prompt import PromptConfig  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.search.math_shepherd import MathShepherdConfig  # noqa: E402
from tasks.search.mcts import MCTSConfig  # noqa: E402
from tasks.search.omegaprm import OmegaPRMConfig  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic  # noqa: E402
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig  # noqa: E402

MODEL = "simulated-arith"


async def _shard(problems, algo_cfg, url: str, per_request: bool, concurrency: int) -> tuple[float, int, str]:
    policy = OpenAIPolicy(OpenAIPolicyConfig(base_url=url, model=MODEL, max_concurrency=concurrency))
    policy.independent_requests = per_request  # instance override: the class default is True
    engine = Engine(policy, OutcomeVerifier(OutcomeVerifierConfig()), PromptConfig(), seed=0)
    t0 = time.perf_counter()
    try:
        result = await run_shard(problems, engine, algo_cfg)
    finally:
        await engine.verifier.aclose()
        await policy.aclose()
    wall = time.perf_counter() - t0
    digest = content_id(*[result.tables[t].to_pylist() for t in sorted(result.tables)])[:12]
    return wall, engine.stats.policy_requests, digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2, help="mean seconds per request (L)")
    ap.add_argument("--jitter", type=float, default=0.9, help="latency is uniform in L*(1 +- jitter)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--algorithms", default="math-shepherd,omegaprm,mcts")
    args = ap.parse_args()
    problems = load_synthetic(SyntheticSourceConfig(num_problems=args.problems, seed=0)).problems
    configs = {"math-shepherd": MathShepherdConfig(k=8), "omegaprm": OmegaPRMConfig(), "mcts": MCTSConfig()}
    rows = []
    with StandinServer(StandinServerConfig(model=MODEL, step_error_rate=0.3, latency_s=args.latency,
                                           latency_jitter=args.jitter)) as server:
        for name in args.algorithms.split(","):
            batched = asyncio.run(_shard(problems, configs[name], server.base_url, False, args.concurrency))
            routed = asyncio.run(_shard(problems, configs[name], server.base_url, True, args.concurrency))
            rows.append((name, batched[1], batched[0], routed[0], batched[0] / routed[0], batched[2] == routed[2]))
    print(f"L = {args.latency} s (jitter {args.jitter}), C = {args.concurrency}, {args.problems} problems, one shard\n")
    print("| algorithm | requests | batch routing s | per-request routing s | speed-up | same data |")
    print("|---|---|---|---|---|---|")
    for name, req, b, r, speed, same in rows:
        print(f"| {name} | {req} | {b:.2f} | {r:.2f} | {speed:.2f}x | {same} |")
    print(f"\nreproduce: .venv/bin/python benchmarks/engine_routing.py --latency {args.latency} --jitter {args.jitter}"
          f" --concurrency {args.concurrency} --problems {args.problems}")


if __name__ == "__main__":
    main()
