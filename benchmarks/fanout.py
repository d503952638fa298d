"""What fanning shards out as deployment runs costs next to running them in the build's own threads.

    .venv/bin/python benchmarks/fanout.py                         # 128 problems, shards of 16, 2 at once
    .venv/bin/python benchmarks/fanout.py --problems 256 --shard-size 32 --shards 2

Starts a `prefect server start` of its own (temporary home and database), registers prefect.yaml's
deployments with `prefect deploy --all`, starts one `prefect worker start --pool stepforge` process, then
builds the same config twice, each into an empty root with the rollout cache off (so both runs search
everything): `concurrency.runner=threads` and `concurrency.runner=deployments`. Prints build time, the
time shards spent searching (summed, from the manifest), and the extra wall time per shard of the
deployment route: the worker's poll, a fresh Python process per shard run importing stepforge and Prefect,
the run's own API calls, and the parent's 2 s poll. Both builds must give the same content hash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("prefect server did not start")
        time.sleep(0.5)


def _build(workdir: Path, env: dict[str, str], runner: str, args: argparse.Namespace) -> dict:
    root = workdir / f"data-{runner}"
    config = {"source": {"kind": "synthetic", "num_problems": args.problems, "seed": 0},
              "shard_size": args.shard_size, "rollout_cache": False, "storage": {"root": str(root)},
              "concurrency": {"runner": runner, "shards": args.shards}}
    path = workdir / f"{runner}.json"
    path.write_text(json.dumps(config))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", "--config", str(path)], env=env, cwd=workdir,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{runner} build failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    manifest = json.loads((root / "demo" / "v1" / "manifest.json").read_text())
    return {"runner": runner, "wall_s": wall, "shards_s": manifest["timings"]["shards_s"],
            "search_s": manifest["stats"]["seconds"], "count": manifest["shards"]["count"],
            "hash": manifest["content_hash"][:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--shards", type=int, default=2, help="concurrency.shards: shards at once, either route")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stepforge-fanout-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "STEPFORGE_HOME": str(REPO), "PYTHONPATH": str(REPO),
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                  env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, cwd=workdir,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(server)
        _wait_healthy(api, server)
        subprocess.run([PREFECT, "work-pool", "create", "stepforge", "--type", "process"], env=env, cwd=REPO,
                       check=True, capture_output=True)
        subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, check=True, capture_output=True)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "stepforge", "--type", "process"], env=env,
                                  cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        procs.append(worker)
        rows = [_build(workdir, env, runner, args) for runner in ("threads", "deployments")]
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"{args.problems} problems, shards of {args.shard_size}, {args.shards} at once; load {load:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'runner':<12} {'shards':>6} {'build s':>8} {'shard phase s':>14} {'search s (sum)':>15} {'hash':>17}")
    for r in rows:
        print(f"{r['runner']:<12} {r['count']:>6} {r['wall_s']:>8.1f} {r['shards_s']:>14.1f} {r['search_s']:>15.1f} "
              f"{r['hash']:>17}")
    threads, deployments = rows
    extra = (deployments["shards_s"] - threads["shards_s"]) / max(1, deployments["count"]) * args.shards
    print(f"extra shard-phase wall time per shard run (x {args.shards} at once): {extra:.1f} s; "
          f"same content hash: {threads['hash'] == deployments['hash']}")
    print("command: .venv/bin/python benchmarks/fanout.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
