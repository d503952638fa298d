"""Throughput of the shard scheduler (tasks/search/engine.py) with the simulated policy.

1. Zero latency: generated steps per second through the scheduler (batching, routing, segmentation and
   outcome verification included), and the same without the simulated policy's own sampling CPU.
2. Latency L per request, backend concurrency C: achieved requests per second against
   - the naive ideal C / L, which no scheduler reaches when fewer than C requests are pending, and
   - the bound of the workload itself. The engine tracks each request's dependency depth (a tree's next
     request depends on every answer it has seen; `EngineStats.requests_by_depth`), so the shard's
     critical path is `depth` requests long. A request at depth d cannot start before d * L, and C slots
     held L per request serve n requests in no less than ceil(n / C) * L, so no scheduler can finish in
     less than the bound max over d of (d + ceil(n_d / C)) * L, n_d the requests at depth d or deeper
     (`bound_s`). It is at least the critical path (depth * L) and every request through C slots
     (requests * L / C); that looser "relaxed bound", max of the two, is kept as a column too (it counts
     fractions of a request per slot: Math-Shepherd's 1,083 requests need 9 rounds of 128, it counts 8.46, so
     no scheduler gets above 0.94 of it). "fraction of bound" is therefore the scheduler's own loss (CPU in
     the event loop and round-by-round batching included); "fraction of C/L" mixes it with the workload's lack
     of parallelism (OmegaPRM and MCTS have one dependent chain per tree).
   `--replay` (on by default) also runs every latency configuration against a policy that answers each
   request from the outputs recorded in the zero-latency run: no policy CPU, so the row isolates the
   engine (scheduling, verification, tree bookkeeping).
   The backend serves requests independently, like an OpenAI-compatible server (a vLLM fleet behind
   `policy.kind=openai`): each request is a call of its own, answered after L once one of C slots is free.
   The replayed runs are timed twice: on the wall clock, and on a CPU clock (an event loop whose time is its
   thread's CPU time plus the waits it skips, `CPUClockLoop`): the wall time the engine would take with a core
   of its own, whatever else the machine runs (on 2 shared cores the wall-clock row moves by 0.1 with the load).
   `--batched` hands it one call per scheduler flush instead, answered when the whole call is done (a
   batching backend; the C-slot latency model fits a server better than a local GPU engine).

    .venv/bin/python benchmarks/engine_throughput.py
    .venv/bin/python benchmarks/engine_throughput.py --problems 64 --latency 0.05 --concurrency 8,32,128
    .venv/bin/python benchmarks/engine_throughput.py --mcts-parallel 4   # MCTS with parallel_iterations=4
    .venv/bin/python benchmarks/engine_throughput.py --omegaprm-parallel 4   # OmegaPRM, parallel_searches=4
    .venv/bin/python benchmarks/engine_throughput.py --batched   # one generate call per flush
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import os
import selectors
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.policy.base import Completion, GenerationRequest  # noqa: E402
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig  # noqa: E402
from tasks.prompt import PromptConfig  # noqa: E402
from tasks.search.engine import Engine  # noqa: E402
from tasks.search.math_shepherd import MathShepherdConfig  # noqa: E402
from tasks.search.mcts import MCTSConfig  # noqa: E402
from tasks.search.omegaprm import OmegaPRMConfig  # noqa: E402
from tasks.shard import run_shard  # noqa: E402
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic  # noqa: E402
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig  # noqa: E402

# One flush = one call of generate in the recording run: no chunking by max_batch.
UNBOUNDED = 1_000_000


def algos(mcts_parallel: int, omegaprm_parallel: int = 1) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {"math-shepherd": lambda: MathShepherdConfig(k=16), "omegaprm": OmegaPRMConfig,
                                         "mcts": MCTSConfig}
    if mcts_parallel > 1:
        out[f"mcts (parallel_iterations={mcts_parallel})"] = lambda: MCTSConfig(parallel_iterations=mcts_parallel)
    if omegaprm_parallel > 1:
        out[f"omegaprm (parallel_searches={omegaprm_parallel})"] = (
            lambda: OmegaPRMConfig(parallel_searches=omegaprm_parallel))
    return out


class ReplayPolicy:
    """Answers each request with the completions recorded for it: latency and concurrency only, no CPU.

    C slots, first come first served, each request holding one for L: a request starts when the earliest
    slot frees and a call returns when its last request is done. The slots are a heap of the times they
    free, so a call costs one timer, not a task, a semaphore and a timer per request (that was backend CPU
    counted as the engine's)."""

    def __init__(self, like: SimulatedPolicy, recorded: dict[GenerationRequest, list[Completion]],
                 latency: float, concurrency: int, max_batch: int, independent: bool) -> None:
        self.policy_id = like.policy_id
        self.step_format = like.step_format
        self.max_batch = max_batch
        self.independent_requests = independent
        self._recorded = recorded
        self._latency = latency
        self._free = [0.0] * concurrency  # when each slot is free again (loop time), a heap

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        loop = asyncio.get_running_loop()
        now = done = loop.time()
        for _ in requests:
            end = max(now, self._free[0]) + self._latency
            heapq.heapreplace(self._free, end)
            done = max(done, end)
        fut = loop.create_future()
        handle = loop.call_at(done, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
        return [self._recorded[r] for r in requests]

    async def aclose(self) -> None:
        return None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _SkippingSelector(selectors.DefaultSelector):
    """Waits for timers by moving the loop's clock instead of sleeping; real I/O (an executor's answer, the
    loop's self-pipe) is still waited for, and that wait counts in full."""

    loop: "CPUClockLoop"

    def select(self, timeout: float | None = None):  # type: ignore[override]
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            t = time.perf_counter()
            ready = super().select(None)
            self.loop.skipped += time.perf_counter() - t
            return ready
        self.loop.skipped += timeout
        return []


class CPUClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is its thread's CPU time plus the idle time it skipped: the replay's latency
    model runs on it unchanged (slots free at loop times), and a run's length on it is the wall time it would
    take on an unloaded core. Only for replays, whose backend is timers: nothing here waits on a socket."""

    def __init__(self) -> None:
        selector = _SkippingSelector()
        self.skipped = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.skipped + time.thread_time()


def run_on(clock: str, coro):
    if clock == "wall":
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=CPUClockLoop) as runner:
        return runner.run(coro)


async def run(problems, cfg_factory, latency: float, concurrency: int, seed: int, *, record: bool = False,
              replay: dict | None = None, independent: bool = True) -> dict[str, Any]:
    """`independent`: the backend serves each request on its own (one call per request), else one call per
    flush; the recording run (zero latency) always gets one call per flush."""
    prompt = PromptConfig()
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.3, latency_s=latency, max_concurrency=concurrency,
                                                   max_batch=UNBOUNDED if record else 256),
                             prompt.step_format)
    rounds: list[int] = []  # requests per generate call of the recording run (one per scheduler flush)
    recorded: dict[GenerationRequest, list[Completion]] = {}
    policy_s = 0.0
    if replay is not None:
        backend: Any = ReplayPolicy(policy, replay, latency, concurrency, 256, independent)
    else:
        backend = policy
        policy.independent_requests = independent and not record  # type: ignore[attr-defined]
        sample_n = policy.sample_n

        def timed(*a, **kw):
            # The simulated policy's sampling is pure CPU: timing it separates the scheduler's own cost.
            nonlocal policy_s
            t = time.perf_counter()
            try:
                return sample_n(*a, **kw)
            finally:
                policy_s += time.perf_counter() - t

        policy.sample_n = timed  # type: ignore[method-assign]
        if record:
            generate = policy.generate

            async def recording(requests):
                rounds.append(len(requests))
                outs = await generate(requests)
                recorded.update(zip(requests, outs))
                return outs

            policy.generate = recording  # type: ignore[method-assign]
    verifier = OutcomeVerifier(OutcomeVerifierConfig())
    engine = Engine(backend, verifier, prompt, seed=seed)
    loop = asyncio.get_running_loop()
    t0, c0 = loop.time(), time.process_time()
    try:
        await run_shard(problems, engine, cfg_factory())
    finally:
        await verifier.aclose()
    wall, cpu = loop.time() - t0, time.process_time() - c0
    s = engine.stats
    return {"wall": wall, "cpu": cpu, "requests": s.policy_requests, "steps": s.generated_steps, "batches": engine._gen.batches,
            "policy_s": policy_s, "rounds": rounds, "recorded": recorded, "depth": dict(sorted(s.requests_by_depth.items()))}


def bound_s(by_depth: dict[int, int], concurrency: int, latency: float) -> float:
    """Least wall time any scheduler needs: for each depth d, the requests at d or deeper start no earlier than
    d * L and take ceil(n / C) whole latencies through C slots."""
    best, deeper = 0.0, 0
    for d in sorted(by_depth, reverse=True):
        deeper += by_depth[d]
        best = max(best, (d + math.ceil(deeper / concurrency)) * latency)
    return best


def relaxed_bound_s(requests: int, depth: int, concurrency: int, latency: float) -> float:
    """The critical path, or all requests through C slots counted in fractions of a latency: below `bound_s`."""
    return max(depth * latency, requests * latency / concurrency)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05, help="simulated seconds per request (L)")
    ap.add_argument("--concurrency", default="8,32,128", help="backend concurrency values C")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-replay", dest="replay", action="store_false", help="skip the replayed-outputs rows")
    ap.add_argument("--batched", action="store_true",
                    help="one generate call per scheduler flush, answered when all of it is done (a batching "
                    "backend), instead of one call per request (an HTTP server)")
    ap.add_argument("--mcts-parallel", type=int, default=4,
                    help="also run MCTS with parallel_iterations=N (1: do not)")
    ap.add_argument("--omegaprm-parallel", type=int, default=4,
                    help="also run OmegaPRM with parallel_searches=N (1: do not)")
    args = ap.parse_args()
    problems = load_synthetic(SyntheticSourceConfig(num_problems=args.problems, seed=args.seed)).problems
    table = algos(args.mcts_parallel, args.omegaprm_parallel)

    print(f"# engine throughput: {args.problems} synthetic problems per shard, simulated policy")
    print("\n## zero latency")
    print("| algorithm | requests | dependency depth | scheduler flushes | generated steps | wall s | steps/s | "
          "simulated-policy CPU s | steps/s excl. policy CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    recordings: dict[str, dict] = {}
    for name, factory in table.items():
        r = asyncio.run(run(problems, factory, 0.0, UNBOUNDED, args.seed, record=True))
        recordings[name] = r
        rest = max(1e-9, r["wall"] - r["policy_s"])
        print(f"| {name} | {r['requests']} | {max(r['depth'], default=-1) + 1} | {len(r['rounds'])} | {r['steps']} | {r['wall']:.2f} | "
              f"{r['steps'] / r['wall']:,.0f} | {r['policy_s']:.2f} | {r['steps'] / rest:,.0f} |")

    # The recordings are the stand-in server's memory, not the engine's; like every object older than a shard (a
    # worker's modules, Prefect's state), the shard runner sets them aside from the collector while it runs
    # (`tasks/collector.py`), so its full passes scan only what the shard allocates. Nothing is frozen here.
    backend = "one call per flush (batching backend)" if args.batched else "one call per request (HTTP server)"
    print(f"\n## latency L = {args.latency} s per request, concurrency C, {backend}")
    cols = ["algorithm", "C", "requests", "critical path s (depth*L)", "relaxed bound s: max(depth*L, requests*L/C)",
            "bound s: max over d of (d + ceil(n_d/C))*L", "wall s", "achieved req/s", "ideal C/L", "fraction of C/L", "fraction of bound", "CPU ms/request"]
    if args.replay:
        # CPU per request of the replayed run is the engine's own (no policy CPU): it does not depend on the
        # machine's load the way wall time does, and bound / (requests * that) caps the fraction of bound an
        # unloaded core could reach.
        cols += ["replay wall s", "replay fraction of bound", "replay fraction of bound, CPU clock",
                 "replay fraction of relaxed bound (wall / CPU clock)", "replay CPU ms/request (engine)",
                 "engine-CPU cap on fraction of bound"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for c in [int(x) for x in args.concurrency.split(",")]:
        for name, factory in table.items():
            rec = recordings[name]
            r = asyncio.run(run(problems, factory, args.latency, c, args.seed, independent=not args.batched))
            depth = max(rec["depth"], default=-1) + 1
            best = bound_s(rec["depth"], c, args.latency)
            relaxed = relaxed_bound_s(r["requests"], depth, c, args.latency)
            achieved = r["requests"] / r["wall"]
            ideal = c / args.latency
            cells = [name, str(c), str(r["requests"]), f"{depth * args.latency:.2f}", f"{relaxed:.3f}", f"{best:.3f}",
                     f"{r['wall']:.2f}", f"{achieved:,.0f}", f"{ideal:,.0f}", f"{achieved / ideal:.2f}",
                     f"{best / r['wall']:.2f}", f"{1000 * r['cpu'] / r['requests']:.2f}"]
            if args.replay:
                rp = asyncio.run(run(problems, factory, args.latency, c, args.seed, replay=rec["recorded"],
                                     independent=not args.batched))
                rc = run_on("cpu", run(problems, factory, args.latency, c, args.seed, replay=rec["recorded"],
                                       independent=not args.batched))
                cells += [f"{rp['wall']:.3f}", f"{best / rp['wall']:.2f}", f"{best / rc['wall']:.2f}",
                          f"{relaxed / rp['wall']:.2f} / {relaxed / rc['wall']:.2f}", f"{1000 * rp['cpu'] / rp['requests']:.2f}",
                          f"{min(1.0, best / rp['cpu']):.2f}"]
            print("| " + " | ".join(cells) + " |")
    print(f"\nload: {os.getloadavg()[0]:.2f} (1-min average, {os.cpu_count()} CPUs)")
    print("reproduce: .venv/bin/python benchmarks/engine_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
