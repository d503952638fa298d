"""The shared rollout cache's cost: publishing one replica's rollouts as a segment (push), merging it into an
empty replica on another "machine" (pull), and a lookup in the replica, on a local folder and on S3 (moto's
server over loopback HTTP).

    .venv/bin/python benchmarks/shared_cache.py                  # the default build's 128 problems
    .venv/bin/python benchmarks/shared_cache.py --problems 512 --no-s3

The rollouts are real: the default build's shard code (simulated policy, Math-Shepherd, step checks, judge)
runs once without Prefect to fill a replica; then each store gets one push of all its rows and one pull
into a fresh replica. A build pays one pull at each shard's start and one push at its end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import shared_cache  # noqa: E402
from flows.build import _run  # noqa: E402
from flows.components import load_source, rollout_cache_path  # noqa: E402
from flows.config import BuildConfig  # noqa: E402
from storage.objectstore import ObjectStore, open_store  # noqa: E402
from storage.rollout_segments import list_segments  # noqa: E402
from tasks.search.rollout_cache import RolloutCache  # noqa: E402


def fill_replica(workdir: Path, problems: int) -> Path:
    cfg = BuildConfig.model_validate({"source": {"num_problems": problems}, "storage": {"root": str(workdir / "gen")}})
    asyncio.run(_run(cfg, load_source(cfg).problems))  # no store: nothing shared, the replica alone fills
    path = rollout_cache_path(cfg)
    assert path is not None
    return path


def measure(name: str, store: ObjectStore, replica: Path, workdir: Path) -> dict[str, object]:
    pushing = RolloutCache(shutil.copy(replica, workdir / f"{name}-a.sqlite"))
    keys = [k for k, _ in pushing.unshared()]
    rows = len(keys)
    t0 = time.perf_counter()
    key = shared_cache.push(store, pushing)
    push_s = time.perf_counter() - t0
    assert key is not None and list_segments(store) == [key]
    size = next(o.size for o in store.list_info(key))
    fresh = RolloutCache(workdir / f"{name}-b.sqlite")
    t0 = time.perf_counter()
    report = shared_cache.pull(store, fresh)
    pull_s = time.perf_counter() - t0
    assert report.rows == rows
    t0 = time.perf_counter()
    for k in keys:
        assert fresh.get(k) is not None
    get_us = (time.perf_counter() - t0) / len(keys) * 1e6
    return {"store": name, "requests": rows, "segment KB": round(size / 1024, 1),
            "bytes/request": round(size / rows), "push s": round(push_s, 3), "pull s": round(pull_s, 3),
            "lookup µs": round(get_us, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 server")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sf-shared-cache-"))
    try:
        t0 = time.perf_counter()
        replica = fill_replica(workdir, args.problems)
        print(f"replica filled by the default shard code in {time.perf_counter() - t0:.1f} s")
        rows = [measure("local", open_store(str(workdir / "root")), replica, workdir)]
        if not args.no_s3:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            try:
                for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
                    os.environ[var] = value
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                boto3.client("s3").create_bucket(Bucket=bucket)
                rows.append(measure("s3 (moto, loopback)", open_store(f"s3://{bucket}/root"), replica, workdir))
            finally:
                server.stop()
        cols = list(rows[0])
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        print(f"load: {os.getloadavg()[0]:.2f} (1 min)  command: {' '.join(sys.argv)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
