"""Scale: what a build costs as it grows, and a model of 1M problems on N workers.

1. Build time and peak memory of `stepforge build` (a fresh process, the synthetic source, simulated policy,
   default Math-Shepherd search) for each size in `--sizes`, with the thread runner (`--dask` adds a
   2-worker Dask LocalCluster, `concurrency.runner=dask`).
2. Prefect's own cost per task run: a flow of M no-op tasks against one of 1 task, on the same ephemeral
   Prefect server a build uses.
3. Catalog sync time with `--versions` releases of one dataset on a moto S3 root (over loopback HTTP).
4. A model of 1M problems from the measured constants (printed with its formula).

    .venv/bin/python benchmarks/scale.py                      # 128 and 1,024 problems, 200 versions
    .venv/bin/python benchmarks/scale.py --sizes 128,1024,8192 --dask
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPFORGE = str(Path(sys.executable).with_name("stepforge"))


def build(n: int, root: Path, dask: bool) -> dict:
    """One `stepforge build` of n synthetic problems in its own process: wall s, peak RSS (`/usr/bin/time`)."""
    # No rollout cache: every size pays for all its requests (a warm cache would hide the policy's work).
    sets = ["--set", f"source.num_problems={n}", "--set", f"storage.root={root}", "--set", f"dataset=scale{n}",
            "--set", "rollout_cache=false"]
    if dask:
        sets += ["--set", "concurrency.runner=dask"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", STEPFORGE, "build", *sets], capture_output=True,
                         text=True, env=env, cwd=root.parent)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"build of {n} problems failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rss = int(next(x for x in out.stderr.splitlines() if x.startswith("maxrss_kb=")).split("=")[1])
    manifest = json.loads((root / f"scale{n}" / "v1" / "manifest.json").read_text())
    stats = manifest.get("stats") or {}
    return {"wall": wall, "rss_mb": rss / 1024, "hash": manifest.get("content_hash"),
            "shards": (manifest.get("shards") or {}).get("count"),
            "requests": (stats.get("policy_requests") or 0) + (stats.get("cache_hits") or 0),
            "steps": (manifest.get("row_counts") or {}).get("steps")}


_PREFECT_CHILD = """
import sys, time
from prefect import flow, task
@task
def noop(i: int) -> int:
    return i
@flow
def many(m: int) -> int:
    return sum(f.result() for f in [noop.submit(i) for i in range(m)])
many(1)  # server start-up and imports
out = {}
for m in (1, %d):
    t = time.perf_counter(); many(m); out[m] = time.perf_counter() - t
print(out[1], out[%d])
"""


def prefect_task_cost(m: int) -> float:
    """Seconds per task run: (flow of m tasks - flow of 1) / (m - 1), ephemeral server, thread runner."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    out = subprocess.run([sys.executable, "-c", _PREFECT_CHILD % (m, m)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"prefect child failed:\n{out.stderr[-2000:]}")
    one, many = (float(x) for x in out.stdout.split()[-2:])
    return (many - one) / (m - 1)


def catalog_sync(versions: int) -> tuple[float, float]:
    """(seconds to commit one small release, seconds to sync a catalog over `versions` of them) on moto S3."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from storage_throughput import make_tables, moto_s3  # the storage benchmark's tables and moto server
    from storage.catalog import Catalog
    from storage.objectstore import open_store
    from storage.release import commit_release, stage_shard

    with moto_s3("scale"):
        store = open_store("s3://scale/root")
        tables = make_tables(200)
        t = time.perf_counter()
        for v in range(versions):
            stage_shard(store, "demo", f"b{v}", "s0", tables)
            commit_release(store, "demo", build_key=f"b{v}", shard_keys=["s0"], manifest_fields={}, card="# demo\n")
        per_commit = (time.perf_counter() - t) / versions
        cat = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb", store)
        t = time.perf_counter()
        synced = cat.sync(store)
        elapsed = time.perf_counter() - t
        assert len(synced.get("demo", [])) == versions, synced
        return per_commit, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,1024", help="numbers of synthetic problems to build")
    ap.add_argument("--dask", action="store_true", help="also build each size on a 2-worker Dask LocalCluster")
    ap.add_argument("--versions", type=int, default=200, help="releases on the moto root for the catalog sync")
    ap.add_argument("--tasks", type=int, default=201, help="no-op task runs for Prefect's cost per task")
    ap.add_argument("--engine-ms", type=float, default=0.30,
                    help="engine CPU ms per policy request (engine_throughput.py, replay, Math-Shepherd: 0.26-0.40 "
                    "at C=128 on a shared 2-core machine, benchmarks/NOTES-issue14.md)")
    ap.add_argument("--fleet-rps", type=float, default=2000.0, help="model: requests/s the vLLM fleet serves")
    ap.add_argument("--workers", type=int, default=8, help="model: worker machines (one core each for the engine)")
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    builds = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        for dask in ([False, True] if args.dask else [False]):
            with tempfile.TemporaryDirectory() as tmp:
                r = build(n, Path(tmp) / "root", dask)
            builds[(n, dask)] = r
            label = f"build {n:,} problems ({'dask 2 workers' if dask else 'threads'})"
            rows.append((label, f"{r['wall']:.1f} s wall, peak RSS {r['rss_mb']:.0f} MB, {r['shards']} shards, "
                                f"{r['requests']} policy requests, {r['steps']} steps, hash {r['hash']}"))
    per_task = prefect_task_cost(args.tasks)
    rows.append((f"Prefect cost per task run ({args.tasks - 1} no-op tasks, thread runner)", f"{1000 * per_task:.1f} ms"))
    per_commit, sync_s = catalog_sync(args.versions)
    rows.append((f"commit one small release to moto S3 (stage + commit)", f"{per_commit:.3f} s"))
    rows.append((f"catalog sync, {args.versions} versions on moto S3", f"{sync_s:.2f} s"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    # The model: a build is the policy fleet's work, the engine's CPU, and a per-shard overhead (staging to the
    # store, Prefect's task run) spread over N workers; the commit and catalog sync are once per build.
    n_ref = max((k for k in builds if not k[1]), default=(0, False))
    ref = builds.get(n_ref)
    if ref and ref["requests"]:
        req_per_problem = ref["requests"] / n_ref[0]
        shard_overhead = per_task + per_commit  # a shard stages about as much as one small release commits
        P, N, R = 1_000_000, args.workers, args.fleet_rps
        fleet = P * req_per_problem / R
        engine = P * req_per_problem * args.engine_ms / 1000 / N
        shards = P / 64 * shard_overhead / N
        print(f"\nmodel, 1M problems: T = max(P*r/R, P*r*e/N) + (P/64)*(p + s)/N + sync")
        print(f"  r = {req_per_problem:.1f} requests/problem (the {n_ref[0]:,}-problem build), e = {args.engine_ms} ms "
              f"engine CPU/request, p = {1000 * per_task:.1f} ms Prefect/task run, s = {per_commit:.3f} s store/shard, "
              f"R = {R:,.0f} requests/s fleet, N = {N} workers")
        print(f"  fleet {fleet / 3600:.2f} h, engine {engine / 3600:.2f} h, shards {shards / 3600:.2f} h "
              f"=> about {(max(fleet, engine) + shards) / 3600:.2f} h; the engine keeps up with the fleet while "
              f"N >= R*e = {R * args.engine_ms / 1000:.1f} workers")
    print(f"\nload: {os.getloadavg()[0]:.2f} (1-min average, {os.cpu_count()} CPUs)")
    print("reproduce: .venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
