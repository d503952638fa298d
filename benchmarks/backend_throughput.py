"""Throughput of the OpenAI-compatible backend against the stand-in server, and prefix reuse of a real shard.

    .venv/bin/python benchmarks/backend_throughput.py                       # the default grid
    .venv/bin/python benchmarks/backend_throughput.py --grid 0.1:32 --requests 2000   # one (L, C) point

The server runs in its own process (`stepforge serve-policy`), so it does not share the client's GIL. With
server latency L per request and at most C requests in flight, the ceiling is C / L requests/s; the table
shows achieved requests/s as a fraction of it (target >= 0.95), clean and with 10% injected faults (5xx,
429 with Retry-After, dropped connections), checks that the faulty run returned exactly the clean run's
samples (nothing lost, nothing duplicated), and reports the prefix-reuse ratio of a Math-Shepherd shard:
of all prompt tokens sent, the share that extends a prompt already sent (the server's `cached_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.policy.base import GenerationRequest, SamplingParams  # noqa: E402
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig  # noqa: E402
from tasks.prompt import PromptConfig, render_prompt  # noqa: E402
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic  # noqa: E402

MODEL = "simulated-arith"


class Server:
    """`stepforge serve-policy` in a subprocess on a free loopback port."""

    def __init__(self, *args: str) -> None:
        code = "from flows.cli import app; app()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve-policy", "--port", "0", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "COLUMNS": "400"})
        deadline = time.time() + 30
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"on (http://\S+/v1)", line)
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"stand-in server did not start: {line}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def workload(num: int, n: int) -> list[GenerationRequest]:
    cfg = PromptConfig()
    problems = load_synthetic(SyntheticSourceConfig(num_problems=max(1, num // 4), seed=11)).problems
    reqs = []
    for i in range(num):
        p = problems[i % len(problems)]
        steps = [f"step {j}" for j in range(i % 4)]
        reqs.append(GenerationRequest(render_prompt(cfg, p.question, steps), SamplingParams(n=n, seed=i)))
    return reqs


async def drive(url: str, reqs: list[GenerationRequest], concurrency: int
                ) -> tuple[float, float, list, OpenAIPolicy]:
    """(wall seconds, steady-state requests/s, results, policy). Steady state: completions 10%..90%, which
    leaves out the ramp-up and the tail where fewer than C requests remain."""
    pol = OpenAIPolicy(OpenAIPolicyConfig(base_url=url, model=MODEL, max_concurrency=concurrency, api_key_env=None,
                                          backoff_initial_s=0.01, backoff_max_s=0.1, timeout_s=10,
                                          max_batch=len(reqs)))
    stamps: list[float] = []

    async def one(req: GenerationRequest):
        out = (await pol.generate([req]))[0]
        stamps.append(time.perf_counter())
        return out

    t0 = time.perf_counter()
    try:
        out = await asyncio.gather(*(one(r) for r in reqs))
    finally:
        await pol.aclose()
    wall = time.perf_counter() - t0
    lo, hi = int(len(stamps) * 0.1), int(len(stamps) * 0.9) - 1
    steady = (hi - lo) / (stamps[hi] - stamps[lo]) if hi > lo and stamps[hi] > stamps[lo] else len(reqs) / wall
    return wall, steady, list(out), pol


def throughput(latency: float, concurrency: int, num: int, n: int, jitter: float) -> list[dict]:
    reqs = workload(num, n)
    rows = []
    clean_texts = None
    for label, extra in (("clean", []), ("10% faults", ["--fault-rate", "0.1", "--faults", "5xx,429,drop",
                                                        "--retry-after", "0.01"])):
        srv = Server("--latency", str(latency), "--latency-jitter", str(jitter), *extra)
        try:
            asyncio.run(drive(srv.url, workload(concurrency, 1), concurrency))  # warm up the server
            wall, steady, out, pol = asyncio.run(drive(srv.url, reqs, concurrency))
        finally:
            srv.close()
        texts = [[c.text for c in g] for g in out]
        samples = sum(len(g) for g in out)
        if clean_texts is None:
            clean_texts = texts
        ceiling = concurrency / latency if latency else None
        rows.append({"run": label, "L (s)": latency, "jitter": jitter, "C": concurrency, "requests": num,
                     "seconds": round(wall, 2), "req/s overall": round(num / wall, 1),
                     "req/s steady": round(steady, 1), "C/L": round(ceiling, 1) if ceiling else "inf",
                     # Both: overall includes ramp-up and tail, which a short run cannot amortise.
                     "overall / (C/L)": round(num / wall / ceiling, 3) if ceiling else "n/a",
                     "fraction (steady)": round(steady / ceiling, 3) if ceiling else "n/a",
                     # A faulty attempt holds its slot for L too (the stand-in fails after the work), so with
                     # faults the ceiling is C/L x requests/attempts; this is the share of that.
                     "of attempt ceiling": round(steady * (num + pol.usage.retries) / num / ceiling, 3)
                     if ceiling else "n/a",
                     "retries": pol.usage.retries, "no loss/dup": samples == num * n and texts == clean_texts})
    return rows


def prefix_reuse(problems: int, k: int) -> dict:
    from flows.components import make_verifier
    from flows.config import BuildConfig
    from tasks.search.engine import Engine
    from tasks.shard import run_shard

    srv = Server()
    try:
        cfg = BuildConfig.model_validate({
            "source": {"kind": "synthetic", "num_problems": problems, "seed": 0},
            "search": {"algorithm": "math-shepherd", "num_solutions": 4, "k": k},
            "policy": {"kind": "openai", "base_url": srv.url, "model": MODEL, "api_key_env": None},
            "rollout_cache": False})
        from flows.components import load_source

        probs = load_source(cfg).problems
        pol = OpenAIPolicy(cfg.policy)
        verifier = make_verifier(cfg)

        async def run() -> None:
            engine = Engine(pol, verifier, cfg.prompt, seed=cfg.seed, temperature=cfg.generation.temperature,
                            max_tokens=cfg.generation.max_tokens)
            try:
                await run_shard(probs, engine, cfg.search, budget=cfg.budget, pairs=cfg.pairs)
            finally:
                await pol.aclose()
                await verifier.aclose()

        t0 = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - t0
    finally:
        srv.close()
    u = pol.usage
    return {"workload": f"math-shepherd, {problems} problems, 4 solutions, k={k}", "requests": u.requests,
            "prompt tokens": u.prompt_tokens, "extending an earlier prompt": u.cached_tokens,
            "prefix-reuse ratio": round(u.cached_tokens / u.prompt_tokens, 3) if u.prompt_tokens else 0.0,
            "seconds": round(wall, 2)}


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jitter", type=float, default=0.2, help="server latency varies in L*(1 +- jitter)")
    ap.add_argument("--grid", nargs="+", default=["0.1:16", "0.5:64", "1:256:5000", "0.1:64", "0:64"],
                    help="LATENCY:CONCURRENCY[:REQUESTS] points; latency 0 measures the client's own ceiling")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--n", type=int, default=4, help="samples per request")
    ap.add_argument("--problems", type=int, default=64, help="problems in the prefix-reuse shard")
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    points = [(float(g.split(":")[0]), int(g.split(":")[1]), int(g.split(":")[2]) if g.count(":") > 1
               else args.requests) for g in args.grid]
    rows = [r for lat, c, num in points for r in throughput(lat, c, num, args.n, args.jitter)]
    print("## Throughput vs the C/L ceiling (stand-in server in its own process)\n")
    print(table(rows))
    print("\n## Prefix reuse of a real shard\n")
    print(table([prefix_reuse(args.problems, args.k)]))
    print(f"\nreproduce: .venv/bin/python benchmarks/backend_throughput.py --grid {' '.join(args.grid)} --jitter {args.jitter} "
          f"--requests {args.requests} --n {args.n} "
          f"--problems {args.problems} --k {args.k}")


if __name__ == "__main__":
    main()
