"""Memory and time of compacting the shared rollout cache (`stepforge datasets compact-cache`) and of a new
replica's first pull of the result, on a local folder or on S3 (moto's server over loopback HTTP).

    .venv/bin/python benchmarks/cache_compaction.py                        # 20 segments x 5,000 rows, local
    .venv/bin/python benchmarks/cache_compaction.py --segments 40 --s3

The segments are synthetic but shaped like real ones: each row a 64-hex cache key and a JSON list of 8
completions (~150 characters of text each, as `RolloutCache.put` stores them), a tenth of each segment's keys
shared with the previous segment (replicas that made the same request). Compaction and the pull each run in
a fresh process, so the peak RSS (VmHWM) is theirs alone; "RSS growth" is that peak minus the RSS
after imports, and "union" the bytes of the distinct rows' strings (what a whole-union compaction holds at
least once as Python strings).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "the sum of and is so we get then add subtract multiply divide total each step answer".split()


def _payload(rng: random.Random) -> str:
    comps = [{"text": " ".join(rng.choice(WORDS) for _ in range(28)) + f" = {rng.randrange(10**6)}",
              "finish_reason": "stop", "prompt_tokens": rng.randrange(50, 400), "completion_tokens": 30,
              "mean_logprob": None, "token_logprobs": None, "cached_tokens": None, "stop_reason": None}
             for _ in range(8)]
    return json.dumps(comps)


def make_segments(root: str, segments: int, rows: int, seed: int = 0) -> int:
    """Write the segments; returns the union's size in bytes (keys + payloads of distinct keys)."""
    from storage.objectstore import open_store
    from storage.rollout_segments import write_segment

    store = open_store(root)
    rng = random.Random(seed)
    union: dict[str, int] = {}
    overlap = rows // 10
    prev: list[tuple[str, str]] = []
    for s in range(segments):
        batch = prev[-overlap:] if prev else []
        while len(batch) < rows:
            batch.append((rng.randbytes(32).hex(), _payload(rng)))
        write_segment(store, batch)
        for k, p in batch:
            union[k] = len(k) + len(p)
        prev = batch
    return sum(union.values())


def _status_mb(field: str) -> float:
    # /proc/self/status, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(what: str, root: str, workdir: str) -> None:
    """One compaction or one pull in this process; prints a JSON line."""
    from flows import shared_cache
    from storage.objectstore import open_store
    from tasks.search.rollout_cache import RolloutCache

    store = open_store(root)
    store.list("")  # clients set up before the baseline
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if what == "compact":
        report = shared_cache.compact(store)
        out = {"rows": report.rows, "segments": report.read}
    else:
        cache = RolloutCache(Path(workdir) / f"pull-{uuid.uuid4().hex[:6]}.sqlite")
        report = shared_cache.pull(store, cache)
        out = {"rows": report.rows, "segments": report.segments}
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    print(json.dumps({**out, "s": round(seconds, 2), "rss_growth_mb": round(peak - base, 1)}))


def run_child(what: str, root: str, workdir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", what, root, str(workdir)], capture_output=True,
                          text=True, env=os.environ.copy(), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=20)
    ap.add_argument("--rows", type=int, default=5000, help="rows per segment")
    ap.add_argument("--s3", action="store_true", help="on moto's S3 server instead of a local folder")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="sf-compaction-"))
    server = None
    try:
        root = str(workdir / "root")
        if args.s3:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
                os.environ[var] = value
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            root = f"s3://{bucket}/root"
        load0 = os.getloadavg()[0]
        union = make_segments(root, args.segments, args.rows)
        compact = run_child("compact", root, workdir)
        pull = run_child("pull", root, workdir)
        from storage.objectstore import open_store
        from storage.rollout_segments import list_segments

        store = open_store(root)
        (key,) = list_segments(store)
        size = next(o.size for o in store.list_info(key))
        print("| store | segments x rows | union MB | segment MB | compact s | compact RSS growth MB "
              "| pull s | pull RSS growth MB |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {'s3 (moto)' if args.s3 else 'local'} | {args.segments} x {args.rows} ({compact['rows']} distinct) "
              f"| {union / 2**20:.1f} | {size / 2**20:.1f} | {compact['s']} | {compact['rss_growth_mb']} "
              f"| {pull['s']} | {pull['rss_growth_mb']} |")
        print(f"load: {load0:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)  command: {' '.join(sys.argv)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
