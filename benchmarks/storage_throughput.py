"""Storage throughput: committing N step rows as a release (local disk and S3 via moto over loopback HTTP)
against a bare ``pyarrow.parquet.write_table`` of the same rows to the same place, a DuckDB aggregate over
the committed version, and the time of each export.

    .venv/bin/python benchmarks/storage_throughput.py            # 1,000,000 step rows
    .venv/bin/python benchmarks/storage_throughput.py --rows 200000 --repeat 1 --no-s3

"commit" = stage the shard (zstd Parquet + sha256 + journal marker) + commit_release (version claim by
conditional create, server-side copy / hard link into v<N>, card, manifest last). "bare" = one
``pq.write_table(..., compression="zstd")`` of the same table. Times are the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.catalog import Catalog  # noqa: E402
from storage.exports import EXPORTERS, run_export  # noqa: E402
from storage.exports.base import load_release  # noqa: E402
from storage.objectstore import ObjectStore, open_store  # noqa: E402
from storage.release import commit_release, stage_shard  # noqa: E402
from storage.schema import SCHEMAS, VERDICT  # noqa: E402

STEPS_PER_SOLUTION = 5
SOLUTIONS_PER_PROBLEM = 4


def make_tables(rows: int, seed: int = 0, judged: bool = False) -> dict[str, pa.Table]:
    """Contract-shaped tables with ``rows`` steps, built column-wise (no Python row loop). ``judged``: a judge
    verdict on every step and pairs a consensus rule can confirm (see ``_judged``)."""
    rng = np.random.default_rng(seed)
    n_sol = rows // STEPS_PER_SOLUTION
    n_prob = max(1, n_sol // SOLUTIONS_PER_PROBLEM)
    sol = np.repeat(np.arange(n_sol), STEPS_PER_SOLUTION)[:rows]
    prob = sol // SOLUTIONS_PER_PROBLEM
    idx = np.tile(np.arange(STEPS_PER_SOLUTION), n_sol)[:rows]
    pid = pa.array([f"p{i:08d}" for i in range(n_prob)])
    sid = pa.array([f"s{i:09d}" for i in range(n_sol)])
    k = np.full(rows, 8, dtype=np.int32)
    c = rng.integers(0, 9, rows).astype(np.int32)
    texts = pa.array([f"step {j}: {a} + {b} = {a + b}" for j, a, b in zip(idx, rng.integers(0, 999, rows), rng.integers(0, 999, rows))])
    nulls_f = pa.nulls(rows, pa.float64())
    steps = pa.Table.from_arrays([
        pid.take(pa.array(prob)), sid.take(pa.array(sol)), pa.array(idx.astype(np.int32)), texts,
        pa.array(np.zeros(rows, np.int32)), pa.array(np.full(rows, 20, np.int32)), pa.array(k), pa.array(c),
        pa.array(c / k), nulls_f, nulls_f, pa.nulls(rows, pa.int32()), pa.nulls(rows, pa.bool_()),
        pa.nulls(rows, pa.bool_()), pa.nulls(rows, pa.bool_()), pa.array(["mc"] * rows),
        # steps.verdicts: no step verifier ran (empty lists, built from offsets without a Python row loop)
        pa.ListArray.from_arrays(pa.array(np.zeros(rows + 1, np.int32)), pa.array([], VERDICT)),
    ], schema=SCHEMAS["steps"])
    problems = pa.Table.from_arrays([
        pid, pa.array(["bench"] * n_prob), pa.array(["math"] * n_prob), pa.array([f"What is question {i}?" for i in range(n_prob)]),
        pa.array([str(i) for i in range(n_prob)]), pa.nulls(n_prob, pa.string()), pa.nulls(n_prob, pa.string()), pa.array(["{}"] * n_prob),
    ], schema=SCHEMAS["problems"])
    n_pairs = n_prob * 2
    pp = np.repeat(np.arange(n_prob), 2)
    kinds = pa.array(np.where(np.arange(n_pairs) % 2 == 0, "first_error", "sibling"))
    prefix = pa.array([["step 0: 1 + 1 = 2"]] * n_pairs, pa.list_(pa.string()))
    pairs = pa.Table.from_arrays([
        pa.array([f"x{i:09d}" for i in range(n_pairs)]), pid.take(pa.array(pp)), pa.array(["prompt"] * n_pairs), prefix,
        pa.array([f"good {i}" for i in range(n_pairs)]), pa.array([f"bad {i}" for i in range(n_pairs)]),
        pa.array(np.ones(n_pairs)), pa.array(np.zeros(n_pairs)), pa.array(np.ones(n_pairs)),
        pa.array([f"Step 2: good {i}\n" for i in range(n_pairs)]), pa.array([f"Step 2: bad {i}\n" for i in range(n_pairs)]),
        pa.array([str(i // 2) for i in range(n_pairs)]), kinds, pa.nulls(n_pairs, pa.string()), pa.nulls(n_pairs, pa.int32()),
    ], schema=SCHEMAS["pairs"])
    if judged:
        steps, pairs = _judged(steps, pairs, sol, idx)
    return {"steps": steps, "problems": problems, "pairs": pairs}


def _judged(steps: pa.Table, pairs: pa.Table, sol: np.ndarray, idx: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """The tables of a consensus export worth measuring (``consensus=mc-and-judge`` keeps every solution and
    every pair): even solutions have their first error at step 2 (MC's ``first_error_index``) and a judge
    that says ``invalid`` there, odd ones none and a judge that finds none; each problem's two pairs come from
    its solutions 0 and 2, prefix = their steps 0-1, rejected = their step 2 (the agreed first error)."""
    rows, n_pairs = steps.num_rows, pairs.num_rows
    bad = (sol % 2 == 0) & (idx == 2)
    fe = pa.array(np.where(sol % 2 == 0, 2, 0).astype(np.int32), mask=sol % 2 == 1)
    verdicts = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), pa.StructArray.from_arrays(
        [pa.array(["judge"] * rows), pa.array(["1"] * rows), pa.array(np.where(bad, "invalid", "valid")),
         pa.nulls(rows, pa.float64()), pa.nulls(rows, pa.string())], fields=list(VERDICT)))
    steps = steps.set_column(steps.schema.get_field_index("first_error_index"), "first_error_index", fe)
    steps = steps.set_column(steps.schema.get_field_index("verdicts"), "verdicts", verdicts)
    # pair i of problem p: its solution 4p + 2 (i % 2); that solution's first row is 5 times its index.
    first = (np.arange(n_pairs) // 2 * SOLUTIONS_PER_PROBLEM + np.arange(n_pairs) % 2 * 2) * STEPS_PER_SOLUTION
    texts = steps.column("step_text").combine_chunks()
    prefix = pa.ListArray.from_arrays(pa.array(np.arange(n_pairs + 1, dtype=np.int32) * 2),
                                      texts.take(pa.array(np.stack([first, first + 1], 1).ravel())))
    pairs = pairs.set_column(pairs.schema.get_field_index("prefix_steps"), "prefix_steps", prefix)
    pairs = pairs.set_column(pairs.schema.get_field_index("rejected"), "rejected", texts.take(pa.array(first + 2)))
    return steps, pairs


def best(fn: Callable[[], object], repeat: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_store(store: ObjectStore, steps: pa.Table, repeat: int, label: str, shards: int = 1) -> dict[str, float]:
    fs, base = store.filesystem_path("bare")
    fs.create_dir(base, recursive=True)
    counter = {"n": 0}

    def bare() -> None:
        counter["n"] += 1
        pq.write_table(steps, f"{base}/steps-{counter['n']}.parquet", filesystem=fs, compression="zstd")

    def commit() -> None:
        counter["n"] += 1
        build = f"bench{counter['n']}"
        size = -(-steps.num_rows // shards)
        keys = []
        for i in range(shards):
            key = f"s{i}"
            stage_shard(store, "bench", build, key, {"steps": steps.slice(i * size, size)})
            keys.append(key)
        commit_release(store, "bench", build_key=build, shard_keys=keys, manifest_fields={}, card="# bench\n")
        store.delete_prefix(f"bench/_staging/{build}/")

    t_bare = best(bare, repeat)
    t_commit = best(commit, repeat)
    return {f"{label}: bare write_table": t_bare, f"{label}: commit ({shards} shard{'s' if shards > 1 else ''})": t_commit,
            f"{label}: ratio": t_commit / t_bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="Skip the moto S3 runs.")
    ap.add_argument("--step-exports-only", action="store_true",
                    help="Only the step exports before/after streaming (commit the release, then measure them).")
    ap.add_argument("--pair-exports", action="store_true",
                    help="With --step-exports-only: also the pair exports' CPU and peak RSS growth, each in a fresh process.")
    ap.add_argument("--pair-consensus", action="store_true",
                    help="With --step-exports-only: also trl-dpo and step-dpo with consensus=mc-and-judge, on a release "
                         "whose steps carry judge verdicts, each in a fresh process.")
    ap.add_argument("--no-step-exports", action="store_true",
                    help="With --step-exports-only: skip the step exports themselves (only the pair/S3 cases asked for).")
    ap.add_argument("--s3-export", action="store_true",
                    help="With --step-exports-only: also one prm800k export written to S3 (moto), with its peak RSS growth.")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tables = make_tables(args.rows)
    steps = tables["steps"]
    print(f"{steps.num_rows:,} step rows ({steps.nbytes / 1e6:.0f} MB in memory), {tables['problems'].num_rows:,} problems, "
          f"{tables['pairs'].num_rows:,} pairs; best of {args.repeat}", flush=True)
    results: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="stepforge-bench-"))
    try:
        local = open_store(str(tmp / "local"))
        if args.step_exports_only:
            stage_shard(local, "demo", "b", "s0", tables)
            m = commit_release(local, "demo", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# demo\n")
            results += bench_step_exports(local, m["version"], steps.num_rows, tmp, run=not args.no_step_exports)
            if args.pair_exports:
                for fmt in PAIR_FORMATS:
                    results += _child_export(local, m["version"], fmt, str(tmp / "pairs" / fmt), steps.num_rows, fmt)
            if args.pair_consensus:
                del tables
                judged = make_tables(args.rows, judged=True)
                stage_shard(local, "judged", "b", "s0", judged)
                jm = commit_release(local, "judged", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# judged\n")
                stage_shard(local, "tiny-judged", "b", "s0", make_tables(1000, judged=True))
                commit_release(local, "tiny-judged", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# t\n")
                del judged
                for fmt in ("trl-dpo", "step-dpo"):
                    results += _child_export(local, jm["version"], fmt, str(tmp / "consensus" / fmt), steps.num_rows,
                                             f"{fmt} consensus=mc-and-judge", {"consensus": "mc-and-judge"}, "judged")
            if args.s3_export:
                with moto_s3("bench-out"):
                    results += _child_export(local, m["version"], "prm800k", "s3://bench-out/prm800k", steps.num_rows,
                                             "prm800k to S3 (moto)")
            _print(results, args)
            return
        for k, v in bench_store(local, steps, args.repeat, "local").items():
            results.append((k, f"{v:.2f}×" if k.endswith("ratio") else f"{v:.3f} s"))
        for k, v in bench_store(local, steps, 1, "local", shards=8).items():
            if "commit" in k:
                results.append((k, f"{v:.3f} s"))
        # The release every later measurement reads: all three tables.
        stage_shard(local, "demo", "b", "s0", tables)
        m = commit_release(local, "demo", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# demo\n")
        cat = Catalog(tmp / "catalog.duckdb")
        cat.sync(local)
        query = (f"SELECT count(*), avg(mc_value), sum((mc_c > 0)::INT) FROM demo_v{m['version']}_steps")
        grouped = (f"SELECT problem_id, avg(mc_value) AS v, count(*) AS n FROM demo_v{m['version']}_steps GROUP BY problem_id ORDER BY v DESC LIMIT 10")
        results.append(("local: duckdb aggregate (count/avg/sum)", f"{best(lambda: cat.sql(query), args.repeat):.3f} s"))
        results.append(("local: duckdb group by problem", f"{best(lambda: cat.sql(grouped), args.repeat):.3f} s"))
        data = load_release(local, "demo", m["version"])
        t = time.perf_counter()
        for name in ("steps", "problems", "pairs"):
            data.table(name)
        _ = data.problems
        results.append(("local: load release tables", f"{time.perf_counter() - t:.3f} s"))
        for fmt in EXPORTERS:
            out = tmp / "exports" / fmt
            elapsed = best(lambda: run_export(local, "demo", m["version"], fmt, str(out), {}, data=data), 1)
            rows = pq.read_metadata(out / "data" / "train-00000.parquet").num_rows
            results.append((f"export {fmt} ({rows:,} rows)", f"{elapsed:.3f} s"))
        results += bench_step_exports(local, m["version"], steps.num_rows, tmp)
        if not args.no_s3:
            results += run_s3(steps, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(results, args)


def _print(results: list[tuple[str, str]], args: argparse.Namespace) -> None:
    width = max(len(k) for k, _ in results)
    print(f"\n{'measurement':<{width}}  value")
    print(f"{'-' * width}  {'-' * 10}")
    for k, v in results:
        print(f"{k:<{width}}  {v}")
    print(f"\nload: {os.getloadavg()[0]:.2f} (1-min average, {os.cpu_count()} CPUs)")
    print(f"reproduce: .venv/bin/python benchmarks/storage_throughput.py --rows {args.rows} --repeat {args.repeat}"
          + (" --no-s3" if args.no_s3 else "") + (" --step-exports-only" if args.step_exports_only else "")
          + (" --pair-exports" if args.pair_exports else "") + (" --pair-consensus" if args.pair_consensus else "")
          + (" --no-step-exports" if args.no_step_exports else "") + (" --s3-export" if args.s3_export else ""))


STEP_FORMATS = ("trl-prm", "math-shepherd", "prm800k")
PAIR_FORMATS = ("trl-dpo", "step-dpo", "rstar-ppm")

# The child process of one streamed export. It first exports a tiny release (imports, thread pools, allocator
# arenas), then resets its peak RSS (`5 > /proc/self/clear_refs`) and reports the peak (VmHWM) of the real
# export less its RSS before it (KiB). Not ru_maxrss: Linux carries it over fork + exec (the parent's peak).
_CHILD = """
import json, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {repo!r})
from storage.exports import run_export
from storage.objectstore import open_store
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
store = open_store({root!r})
run_export(store, "tiny" + {suffix!r}, 1, {fmt!r}, {warm!r} or tempfile.mkdtemp(), {options!r})  # the same kind of target
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t, c = time.perf_counter(), time.process_time()
record = run_export(store, {dataset!r}, {version}, {fmt!r}, {out!r}, {options!r})
elapsed, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({{"s": elapsed, "cpu": cpu, "rss_before": before, "rss_after": status("VmHWM"), "rows": record["rows"],
                  "bytes": sum(f["bytes"] for f in record["files"].values())}}))
"""


def bench_step_exports(store: ObjectStore, version: int, rows: int, tmp: Path, run: bool = True) -> list[tuple[str, str]]:
    """The step exports read from the committed files: the whole-table exporters they replaced (frozen in
    tests/export_reference.py, exporter function only, tables already in memory) against the streaming ones
    (the whole ``run_export``, files read in batches), each streamed export in a fresh process so its peak RSS
    is its own: "peak RSS growth" is the child's peak RSS (VmHWM) less its RSS after the imports."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import export_reference as ref  # noqa: E402

    from storage.exports import parse_options

    old = {"trl-prm": ref.trl_prm_export, "math-shepherd": ref.math_shepherd_export, "prm800k": ref.prm800k_export}
    out: list[tuple[str, str]] = []
    tiny = make_tables(1000)
    stage_shard(store, "tiny", "b", "s0", tiny)
    commit_release(store, "tiny", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# tiny\n")
    if not run:
        return out
    data = load_release(store, "demo", version)
    for name in ("steps", "problems"):
        data.table(name)
    for fmt in STEP_FORMATS:
        t, c = time.perf_counter(), time.process_time()
        old[fmt](data, parse_options(fmt, {}))
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        out.append((f"{fmt}: whole-table exporter (before), tables in memory",
                    f"{elapsed:.3f} s wall, {cpu:.3f} s CPU = {rows / cpu / 1e6:.2f} M step rows per CPU s"))
        t, c = time.perf_counter(), time.process_time()
        EXPORTERS[fmt].fn(load_release(store, "demo", version), parse_options(fmt, {}))
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        out.append((f"{fmt}: streamed exporter alone (after), from files",
                    f"{elapsed:.3f} s wall, {cpu:.3f} s CPU = {rows / cpu / 1e6:.2f} M step rows per CPU s"))
        out += _child_export(store, version, fmt, str(tmp / "stream" / fmt), rows, fmt)
    return out


def _child_export(store: ObjectStore, version: int, fmt: str, target: str, rows: int, label: str,
                  options: dict | None = None, dataset: str = "demo") -> list[tuple[str, str]]:
    """One ``run_export`` of ``dataset`` to ``target`` in a fresh process: its wall and CPU time and its peak RSS
    growth. The warm-up exports ``tiny-<dataset>`` (``tiny`` for ``demo``) with the same options."""
    import json
    import subprocess

    warm = target + "-warm-up" if target.startswith("s3://") else ""
    code = _CHILD.format(repo=str(Path(__file__).resolve().parent.parent), root=store.root, version=version,
                         fmt=fmt, out=target, warm=warm, options=options or {}, dataset=dataset,
                         suffix="" if dataset == "demo" else f"-{dataset}")
    res = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    return [(f"{label}: streamed run_export (after): exporter + Parquet/JSONL write + card, {res['rows']:,} rows, "
             f"{res['bytes'] / 1e6:.0f} MB",
             f"{res['s']:.3f} s wall, {res['cpu']:.3f} s CPU = {rows / res['cpu'] / 1e6:.2f} M step rows per CPU s, "
             f"{rows / res['s'] / 1e6:.2f} M per wall s"),
            (f"{label}: streamed run_export peak RSS growth", f"{(res['rss_after'] - res['rss_before']) / 1024:.0f} MB")]


@contextlib.contextmanager
def moto_s3(bucket: str):
    """moto's S3 server on a free loopback port with `bucket` created, the AWS variables pointing at it
    (dummy keys), stopped on exit: the benchmarks' real S3 API over HTTP."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield
    finally:
        server.stop()


def run_s3(steps: pa.Table, repeat: int) -> list[tuple[str, str]]:
    with moto_s3("bench-bucket"):
        store = open_store("s3://bench-bucket/data")
        out = []
        for k, v in bench_store(store, steps, repeat, "s3 (moto)").items():
            out.append((k, f"{v:.2f}×" if k.endswith("ratio") else f"{v:.3f} s"))
        stage_shard(store, "demo", "b", "s0", {"steps": steps})
        m = commit_release(store, "demo", build_key="b", shard_keys=["s0"], manifest_fields={}, card="# demo\n")
        cat = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb", store)
        cat.sync(store)
        query = f"SELECT count(*), avg(mc_value), sum((mc_c > 0)::INT) FROM demo_v{m['version']}_steps"
        out.append(("s3 (moto): duckdb httpfs aggregate", f"{best(lambda: cat.sql(query), repeat):.3f} s"))
        return out


if __name__ == "__main__":
    main()
