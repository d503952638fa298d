"""Lean REPL pool on the stand-in REPL with a fixed cost per proof (the stand-in is not Lean: only the pool's
own cost is measured here, against the same processes driven raw).

1. raw: P stand-in processes, each driven directly over its pipes by a thread, one proof after another
   (the fixed cost plus the stand-in's checking and framing, with the same CPU contention as the pool);
2. pool: the same proofs through `ReplPool` with P processes (headers warmed first); overhead = pool wall
   / raw wall - 1 (goal: <= 5 %), medians of alternating repeats;
3. header reuse: proofs whose header costs H ms, reused per process vs re-elaborated with every proof
   (processes started before timing in both);
4. faults: a share of proofs hang or crash the process (half each); every proof must be answered exactly
   once, and no proof may get a verdict contrary to its truth (valid proofs never `invalid`, wrong ones
   never `valid`).

Usage: .venv/bin/python benchmarks/lean_pool.py [--proofs 400] [--repls 4] [--cost-ms 40] [--header-cost-ms 400]
       [--fault-rate 0.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verifiers.base import Status  # noqa: E402
from verifiers.lean.base import LeanItem  # noqa: E402
from verifiers.lean.repl import ReplPool  # noqa: E402

STANDIN = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]
HEADER = "import Mathlib\n\nopen Real"


def proofs(n: int, tag: str = "p") -> list[tuple[LeanItem, bool]]:
    """n proofs with their truth: every fifth claims a wrong sum."""
    out = []
    for i in range(n):
        wrong = i % 5 == 0
        body = (f"theorem {tag}{i} : ({i} : ℚ) + 12 = {i + 12 + (1 if wrong else 0)} := by\n"
                f"  have h : ({i} : ℚ) * 2 = {2 * i} := by norm_num\n  norm_num")
        out.append((LeanItem(body, HEADER, f"{tag}{i}"), not wrong))
    return out


def raw_wall(items: list[LeanItem], cost_ms: float, repls: int) -> float:
    """Wall time of `repls` stand-in processes each driven directly (no pool) over its share of `items`."""
    import threading

    procs = [subprocess.Popen([*STANDIN, "--cost-ms", str(cost_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(repls)]

    def ask(p: subprocess.Popen, obj: dict) -> dict:
        assert p.stdin and p.stdout
        p.stdin.write((json.dumps(obj) + "\n\n").encode())
        p.stdin.flush()
        lines = []
        while True:
            line = p.stdout.readline()
            if not line.strip():
                if lines:
                    return json.loads(b"".join(lines))
                continue
            lines.append(line)

    envs = [ask(p, {"cmd": HEADER})["env"] for p in procs]
    shares = [items[i::repls] for i in range(repls)]

    def drive(i: int) -> None:
        for it in shares[i]:
            ask(procs[i], {"cmd": it.body, "env": envs[i]})

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(repls)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for p in procs:
        assert p.stdin
        p.stdin.close()
        p.wait()
    return elapsed


def make_pool(repls: int, *args: str, timeout_s: float = 30.0) -> ReplPool:
    return ReplPool([*STANDIN, *args], max_repls=repls, max_repl_uses=None, max_repl_mem_mb=2048, timeout_s=timeout_s,
                    header_timeout_s=60, max_wait_s=600, crash_retries=1)


async def timed(pool: ReplPool, items: list[LeanItem]) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = await pool.check_many(items)
    return time.perf_counter() - t0, out


async def main(ns: argparse.Namespace) -> None:
    rows: list[tuple[str, str]] = []
    work = proofs(ns.proofs)
    items = [it for it, _ in work]

    # Raw and pool runs alternate and the medians are compared: the machine's load drifts between runs.
    raws, walls = [], []
    for _ in range(ns.repeats):
        raws.append(raw_wall(items, ns.cost_ms, ns.repls))
        pool = make_pool(ns.repls, "--cost-ms", str(ns.cost_ms))
        await pool.check_many([it for it, _ in proofs(ns.repls * 2, "warm")])  # start processes, elaborate headers
        wall, out = await timed(pool, items)
        await pool.aclose()
        walls.append(wall)
        assert all(o.status is (Status.VALID if ok else Status.INVALID) for o, (_, ok) in zip(out, work))
    raw, wall = statistics.median(raws), statistics.median(walls)
    rows.append((f"raw: {ns.repls} processes driven directly, proofs/s", f"{len(items) / raw:.1f}"))
    rows.append((f"pool ({ns.repls} processes): proofs/s", f"{len(items) / wall:.1f}"))
    rows.append(("pool overhead over raw REPL time (goal <= 5 %)", f"{(wall / raw - 1) * 100:+.1f} %"))

    n_header = max(ns.repls * 4, ns.proofs // 10)
    reuse_items = [it for it, _ in proofs(n_header, "r")]
    cold = [LeanItem(f"theorem w{i} : (1 : ℕ) = 1 := by decide", "", f"w{i}") for i in range(ns.repls * 2)]
    pool = make_pool(ns.repls, "--cost-ms", str(ns.cost_ms), "--header-cost-ms", str(ns.header_cost_ms))
    await pool.check_many(cold)  # processes started, no header elaborated yet
    reuse_wall, _ = await timed(pool, reuse_items)
    await pool.aclose()
    # Without reuse every proof carries its imports and runs in a fresh environment (no `env`).
    inline = [LeanItem(f"{HEADER}\n{it.body}", "", it.id) for it in reuse_items]
    pool = make_pool(ns.repls, "--cost-ms", str(ns.cost_ms), "--header-cost-ms", str(ns.header_cost_ms))
    await pool.check_many(cold)
    fresh_wall, out = await timed(pool, inline)
    await pool.aclose()
    assert all(o.status is not Status.ERROR for o in out)
    rows.append((f"header reuse speed-up ({n_header} proofs, header {ns.header_cost_ms:g} ms)",
                 f"{fresh_wall / reuse_wall:.1f}x ({fresh_wall:.2f} s -> {reuse_wall:.2f} s)"))

    half = ns.fault_rate / 2
    pool = make_pool(ns.repls, "--cost-ms", str(ns.cost_ms), "--hang-rate", str(half), "--crash-rate", str(half),
                     "--seed", "7", timeout_s=ns.fault_timeout_s)
    fault_wall, out = await timed(pool, items)
    stats = dict(pool.stats)
    await pool.aclose()
    counts = collections.Counter(o.status.value for o in out)
    contrary = sum(1 for o, (_, ok) in zip(out, work) if o.status is (Status.INVALID if ok else Status.VALID))
    answered = len(out)
    rows.append((f"with {ns.fault_rate:.0%} hangs+crashes: answered / sent", f"{answered} / {len(items)}"))
    rows.append(("  verdicts", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
    rows.append(("  verdicts contrary to the truth (must be 0)", str(contrary)))
    rows.append(("  kills on timeout / crashes seen / processes started",
                 f"{stats['killed_timeout']} / {stats['crashed']} / {stats['started']}"))
    rows.append(("  wall time", f"{fault_wall:.1f} s"))
    assert answered == len(items) and contrary == 0

    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value\n{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\ncommand: .venv/bin/python benchmarks/lean_pool.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(ns).items()))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proofs", type=int, default=400)
    ap.add_argument("--repls", type=int, default=4)
    ap.add_argument("--cost-ms", type=float, default=40.0)
    ap.add_argument("--header-cost-ms", type=float, default=400.0)
    ap.add_argument("--fault-rate", type=float, default=0.1)
    ap.add_argument("--fault-timeout-s", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="Alternating raw/pool runs; medians are compared.")
    asyncio.run(main(ap.parse_args()))
