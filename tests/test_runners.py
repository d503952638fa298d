"""Shard tasks on another engine (`concurrency.runner`): the default build on a 2-worker Dask LocalCluster gives
the thread runner's content hash; a build killed mid-way on Dask, and one whose Dask worker process dies
under a shard, rerun to it; the default build on a local Ray instance and on an existing Ray cluster
(`concurrency.address`, a head started with `ray start`) give it too, and a build killed mid-way on Ray
reruns to it (where the `ray` extra is installed); a kill leaves no process of the build running; Ray
without its extra fails naming the extra; configs say what is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from flows.config import BuildConfig, load_config
from flows.runners import check_runner, make_task_runner
from storage.errors import ConfigError
from storage.objectstore import open_store
from storage.release import list_versions

from conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_server")

DEFAULT_HASH = "d18c4e2a64f2f1b4"  # `stepforge build` in an empty folder (README, the lead's reference)


def _default(root: Path, **changes) -> BuildConfig:
    return BuildConfig.model_validate({"storage": {"root": str(root)}, **changes})


def test_the_default_build_on_a_dask_local_cluster_gives_the_thread_runners_content_hash(tmp_path):
    threads = build_dataset(_default(tmp_path / "threads"))
    dask = build_dataset(_default(tmp_path / "dask", concurrency={"runner": "dask", "shards": 2}))
    assert dask["content_hash"] == threads["content_hash"]
    assert dask["content_hash"].startswith(DEFAULT_HASH)
    assert (dask["shards"], dask["steps"], dask["pairs"]) == (threads["shards"], threads["steps"], threads["pairs"])
    # The shards ran in the cluster's worker processes, which reported to the flow's Prefect server.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["shard-0", "shard-1"])))
    assert sum(1 for r in runs if r.state is not None and r.state.is_completed()) >= 4  # both builds' shards


# Small shards with a slow simulated policy: a kill lands with some shards staged and others not.
SLOW = dict(source={"kind": "synthetic", "num_problems": 48, "seed": 5}, shard_size=8,
            search={"algorithm": "math-shepherd", "num_solutions": 2, "k": 8})


def _slow(root: Path, **changes) -> BuildConfig:
    return BuildConfig.model_validate({"dataset": "demo", **SLOW, "storage": {"root": str(root)}, **changes})


@pytest.fixture(scope="module")
def slow_reference(prefect_server, tmp_path_factory) -> str:
    """The content hash of the `_slow` build on threads: what every crashed and resumed build must reach.
    Built once for the module's crash tests."""
    return build_dataset(_slow(tmp_path_factory.mktemp("ref"), rollout_cache=False))["content_hash"]


# Loaded by every Python process of a build under test: shards past the first two wait for ever just before
# staging, so a kill lands with exactly two staged. Tickets are exclusive creates, so concurrent shards in
# several processes agree on the order.
STAGE_GATE = """
import os
import time

if os.environ.get("STEPFORGE_TEST_STAGE_GATE"):
    import storage.release as _release

    _stage = _release.stage_shard

    def stage_shard(*args, **kwargs):
        gate = os.environ["STEPFORGE_TEST_STAGE_GATE"]
        n = 0
        while True:
            try:
                os.close(os.open(os.path.join(gate, f"ticket-{n}"), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                n += 1
        while n >= 2:
            time.sleep(60)
        return _stage(*args, **kwargs)

    _release.stage_shard = stage_shard
"""


def _staged(root: Path) -> int:
    return len(list(root.glob("demo/_staging/*/*/_DONE.json")))


def _kill_mid_build(config: BuildConfig, tmp_path: Path) -> list[str]:
    """Run `stepforge build` on `config` in a process of its own session and SIGKILL the session once two shards
    are staged and a third is held at the gate: mid-build, whatever the load. Returns what the kill left
    running of the build's processes (names): a crash must take every process of the build with it."""
    import psutil
    from prefect.settings import PREFECT_API_URL

    root = Path(config.storage.root)
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    # A deterministic kill point: every Python process of the build (the flow's, a cluster's workers) loads
    # this sitecustomize, which lets the first two shards stage and holds every later one just before staging.
    hooks, gate = tmp_path / "hooks", tmp_path / "gate"
    hooks.mkdir(), gate.mkdir()
    (hooks / "sitecustomize.py").write_text(STAGE_GATE)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}",
           "STEPFORGE_TEST_STAGE_GATE": str(gate)}
    # Its own session: the kill takes the flow process and the cluster it started (Dask's scheduler, nannies
    # and workers; Ray's GCS, raylet and workers).
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", "--config", str(path)], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not (_staged(root) == 2 and (gate / "ticket-2").exists()):
        assert time.monotonic() < deadline, "the build never reached its third shard"
        time.sleep(0.2)
    done = _staged(root)
    # Every process of the build, taken just before the kill: one that left the session would survive it.
    build = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done == 2, f"two shards staged before the kill, not {done} ({proc.stderr.read()[-800:]!r})"
    assert list_versions(open_store(str(root)), "demo") == [], "a killed build leaves nothing visible"
    return _reap(build)


def _reap(pids: list[int], grace_s: float = 30.0) -> list[str]:
    """Wait up to `grace_s` for the processes `pids` to end, SIGKILL those that did not (so no test leaves them
    running) and return their names: empty when every one ended on its own."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    names = []
    for p in alive:
        try:
            names.append(p.name())
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return names


@pytest.mark.slow
def test_a_dask_build_killed_mid_way_resumes_to_the_thread_runners_hash(slow_reference, tmp_path):
    crashed = _slow(tmp_path / "data", concurrency={"runner": "dask", "shards": 2},
                    policy={"kind": "simulated", "latency_s": 0.2})
    assert _kill_mid_build(crashed, tmp_path) == [], "the kill left processes of the build running"

    resumed = build_dataset(crashed)
    assert resumed["shards_resumed"] == 2 and resumed["version"] == 1
    assert resumed["content_hash"] == slow_reference


@pytest.mark.slow
def test_a_dask_worker_killed_under_a_shard_still_gives_the_reference_hash(slow_reference, tmp_path):
    """An existing cluster (`concurrency.address`): one worker process is SIGKILLed while shards run. Dask
    hands its shard to another worker (the nanny restarts the dead one); the build either carries on or
    fails with that shard's error, and then a rerun resumes. Either way the data is the reference's."""
    from distributed import Client, LocalCluster

    root = tmp_path / "data"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cfg = _slow(root, concurrency={"runner": "dask", "address": cluster.scheduler_address},
                    policy={"kind": "simulated", "latency_s": 0.2})
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = build_dataset(cfg)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and thread.is_alive() and _staged(root) < 1:
            time.sleep(0.05)
        assert thread.is_alive() and _staged(root) < 6, "the kill should land mid-build"
        busy = [addr for addr, keys in client.processing().items() if keys]
        assert busy, "a worker is running a shard"
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        thread.join(600)
        assert not thread.is_alive()
        print("worker kill outcome:", repr(outcome.get("error", "carried on"))[:300])
        if "error" in outcome:  # failed with the lost shard: the rerun resumes from the staged ones
            summary = build_dataset(cfg)
            assert summary["shards_resumed"] >= 1
        else:
            summary = outcome["summary"]
    assert summary["version"] == 1
    assert summary["content_hash"] == slow_reference


def test_the_thread_runner_is_the_default_and_dask_needs_no_address():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    cfg = BuildConfig()
    assert cfg.concurrency.runner == "threads"
    assert isinstance(make_task_runner(cfg.concurrency), ThreadPoolTaskRunner)
    local = make_task_runner(load_config(None, ["concurrency.runner=dask", "concurrency.shards=3"]).concurrency)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3 and local.address is None
    remote = make_task_runner(load_config(None, ["concurrency.runner=dask",
                                                 "concurrency.address=tcp://10.0.0.5:8786"]).concurrency)
    assert remote.address == "tcp://10.0.0.5:8786"
    # The runner is how the build runs, not what it makes: the build key (and so staging) is the same.
    assert load_config(None, ["concurrency.runner=dask"]).build_key() == cfg.build_key()


def test_an_address_without_a_cluster_runner_is_rejected_naming_both_fields():
    with pytest.raises(ConfigError, match=r"`concurrency.address`.*`concurrency.runner` is threads") as info:
        load_config(None, ["concurrency.address=tcp://10.0.0.5:8786"])
    assert info.value.field == "concurrency.address"
    with pytest.raises(ConfigError, match="`concurrency.runner`"):
        load_config(None, ["concurrency.runner=spark"])


_RAY_MISSING = next((m for m in ("ray", "prefect_ray") if __import__("importlib").util.find_spec(m) is None), None)
needs_ray = pytest.mark.skipif(_RAY_MISSING is not None, reason=f"{_RAY_MISSING} is not importable: Ray is the "
                               "optional `ray` extra (pip install -e '.[ray]'), which this environment does not have")


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _left_running(before: set[int]) -> list[str]:
    """Names of this process's descendants that are running now and were not in `before` (`_children()`)."""
    import psutil

    return [p.name() for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


@needs_ray
def test_the_default_build_on_a_local_ray_instance_gives_the_thread_runners_content_hash(tmp_path):
    import ray

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    assert not ray.is_initialized()
    before = _children()
    # Two CPU slots (concurrency.shards), so two shard tasks at once on a 2-core machine.
    state = build_dataset(_default(tmp_path / "ray", concurrency={"runner": "ray", "shards": 2}), return_state=True)
    summary = state.result()
    assert summary["content_hash"].startswith(DEFAULT_HASH)  # the thread runner's
    assert (summary["shards"], summary["shards_resumed"]) == (2, 0)
    # The build's own local Ray instance is gone with it: no driver connection, no Ray processes left.
    assert not ray.is_initialized()
    assert _left_running(before) == []
    # The shard tasks ran in Ray's worker processes and reported to the flow's Prefect server.
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shards = [r for r in runs if r.name.startswith("shard-")]
    assert len(shards) == 2 and all(r.state.is_completed() for r in shards), [(r.name, r.state) for r in runs]


@dataclass
class RayHead:
    address: str  # what `concurrency.address` takes: the head's GCS address, host:port
    logs: Path  # the session's log folder: one worker-*.out per worker process the head started


@pytest.fixture(scope="module")
def ray_head():
    """An existing Ray cluster, as an operator starts one: `ray start --head` with 2 CPU slots, in a session of
    its own and its own temp folder (other Ray users of the machine are left alone). Stopped at the end with
    every process it started: SIGTERM, then SIGKILL for any still running after 30 s, and the teardown fails
    naming any that needed it."""
    import contextlib
    import shutil
    import socket
    import tempfile

    import psutil

    if _RAY_MISSING is not None:
        pytest.skip(f"{_RAY_MISSING} is not importable (the `ray` extra)")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # Token authentication off, whatever ~/.ray holds: `ray start` turns it on when ~/.ray/auth_token exists
    # (any local `ray.init()`, the local-instance runner included, writes one), while a driver given an
    # explicit address sends no token unless RAY_AUTH_MODE=token (README, "Where shards run").
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Ports are picked before the head binds them (ours here, Ray's own for its other servers), so one can be
    # taken in between: the head then exits saying "Address already in use" and is started again on new ports.
    for attempt in range(3):
        port = free_port()
        # Short: Ray's Unix sockets live under it, and a socket path may not pass 107 bytes.
        temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        log = temp / "start.log"
        # --block keeps `ray start` as the parent of the head's processes, so the teardown can find them all.
        # The client server's port is free too (its default, 10001, would clash with another head on the machine).
        with log.open("w") as out:
            head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                     f"--port={port}", f"--ray-client-server-port={free_port()}", "--num-cpus=2",
                                     "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                                    env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text() and head.poll() is None:
            assert time.monotonic() < deadline, f"the Ray head did not start in 180 s: {log.read_text()[-800:]}"
            time.sleep(0.2)
        if head.poll() is None or "already in use" not in log.read_text().lower() or attempt == 2:
            break
        with contextlib.suppress(ProcessLookupError):  # what the failed head left in its session
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    try:
        assert head.poll() is None, f"`ray start` exited {head.returncode}: {log.read_text()[-800:]}"
        yield RayHead(f"127.0.0.1:{port}", temp / "session_latest" / "logs")
    finally:
        started = [head.pid]
        with contextlib.suppress(psutil.NoSuchProcess):  # a head that exited: its own error says why
            started += [p.pid for p in psutil.Process(head.pid).children(recursive=True)]
        head.terminate()
        left = _reap(started)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"the stopped Ray head left {left} running (killed)"


def _ray_workers(head: RayHead) -> int:
    return len(list(head.logs.glob("worker-*.out")))


@needs_ray
def test_the_default_build_on_an_existing_ray_cluster_gives_the_thread_runners_content_hash(ray_head, tmp_path):
    """`concurrency.address`: the build connects to the cluster as a driver, its shards run on the cluster's
    workers, and it leaves the cluster running with no Ray process of its own."""
    import ray

    before, workers = _children(), _ray_workers(ray_head)
    summary = build_dataset(_default(tmp_path / "data", concurrency={"runner": "ray", "address": ray_head.address}))
    assert summary["content_hash"].startswith(DEFAULT_HASH)  # the thread runner's
    assert (summary["shards"], summary["shards_resumed"]) == (2, 0)
    assert _ray_workers(ray_head) > workers, "the shards ran on the cluster's workers"
    # Disconnected, with no local Ray instance started beside the cluster.
    assert not ray.is_initialized() and _left_running(before) == []


@pytest.mark.slow
@needs_ray
def test_a_ray_build_killed_mid_way_resumes_on_a_ray_cluster_to_the_thread_runners_hash(ray_head, slow_reference,
                                                                                         tmp_path):
    """Killed on a local Ray instance (the flow process, Ray's GCS, raylet and workers at once), rerun on an
    existing cluster: the shards staged before the kill are kept, whichever runner runs the rest."""
    # No simulated latency: the stage gate alone decides where the kill lands.
    crashed = _slow(tmp_path / "data", concurrency={"runner": "ray", "shards": 2})
    assert _kill_mid_build(crashed, tmp_path) == [], "the kill left processes of the build running"

    # The runner is not part of the build key: the rerun on the cluster finds the crashed build's staging.
    resumed = build_dataset(_slow(tmp_path / "data", concurrency={"runner": "ray", "address": ray_head.address}))
    assert resumed["shards_resumed"] == 2 and resumed["version"] == 1
    assert resumed["content_hash"] == slow_reference


def test_ray_without_its_extra_fails_before_any_work_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    import flows.runners

    real_find_spec = importlib.util.find_spec
    # Without the extra whether or not this environment has it: the runner check sees no prefect_ray.
    monkeypatch.setattr(flows.runners.importlib.util, "find_spec",
                        lambda name, *a: None if name == "prefect_ray" else real_find_spec(name, *a))
    cfg = _default(tmp_path / "data", concurrency={"runner": "ray"})
    with pytest.raises(ConfigError, match=r"prefect-ray is not installed.*stepforge\[ray\]") as info:
        check_runner(cfg.concurrency)
    assert info.value.field == "concurrency.runner"
    # The CLI says so in one line before the Prefect server starts; the flow (a deployment run) too.
    out = CliRunner().invoke(app, ["build", "--set", f"storage.root={tmp_path / 'cli'}",
                                   "--set", "concurrency.runner=ray"])
    assert out.exit_code == 2 and "pip install 'stepforge[ray]'" in out.output.splitlines()[-1]
    assert not (tmp_path / "cli").exists()
    with pytest.raises(ConfigError, match=r"stepforge\[ray\]"):
        build_dataset(cfg)
    assert list_versions(open_store(str(tmp_path / "data")), "demo") == []
