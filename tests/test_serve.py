"""`stepforge serve`: prefect.yaml's deployments served from one process, runs started through the API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import REPO
from flows.serve import load_deployments
from storage.errors import ConfigError
from storage.objectstore import open_store
from storage.release import list_versions


class _Served:
    """A `stepforge serve` process (its output once stopped)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.out = ""


@contextlib.contextmanager
def stepforge_serve(tmp_path: Path, deployment: str, *, renamed_from: str | None = None) -> Iterator[_Served]:
    """Run `stepforge serve --deployment NAME` in `tmp_path` against the test's Prefect server; stop it with
    SIGINT (SIGKILL after 60 s) on leaving. `renamed_from`: serve that prefect.yaml entry under the name
    `deployment` (a prefect.yaml of the test's own), so other tests' deployments are left alone."""
    from prefect.settings import PREFECT_API_URL

    cmd = [sys.executable, "-m", "flows.cli", "serve", "--deployment", deployment]
    if renamed_from is not None:
        spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
        spec["deployments"] = [{**d, "name": deployment} for d in spec["deployments"] if d["name"] == renamed_from]
        (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
        cmd += ["--prefect-file", str(tmp_path / "prefect.yaml")]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    served = _Served(subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        yield served
    finally:
        os.killpg(served.proc.pid, signal.SIGINT)
        try:
            served.out, _ = served.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(served.proc.pid, signal.SIGKILL)
            served.out, _ = served.proc.communicate()


def test_served_deployments_mirror_prefect_yaml():
    deployments = {d.name: d for d in load_deployments(REPO / "prefect.yaml")}
    assert set(deployments) == {"build-on-demand", "build-nightly", "build-shard", "mustard-on-demand",
                                "publish-on-commit"}
    nightly = deployments["build-nightly"]
    assert nightly.parameters["config"]["dataset"] == "nightly"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    (trigger,) = deployments["publish-on-commit"].triggers
    assert trigger.expect == {"stepforge.version.committed"} and trigger.enabled is False
    # Served: no pool, set explicitly, so re-registering a pooled deployment clears its pool.
    assert all(d.work_pool_name is None and "work_pool_name" in d.model_fields_set for d in deployments.values())
    only = load_deployments(REPO / "prefect.yaml", ["build-on-demand"])
    assert [d.name for d in only] == ["build-on-demand"]
    with pytest.raises(ConfigError, match="build-nightly"):  # the error lists what exists
        load_deployments(REPO / "prefect.yaml", ["build-daily"])


@pytest.mark.slow
def test_stepforge_serve_runs_a_build_started_through_the_api(prefect_server, small_config, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with stepforge_serve(tmp_path, "build-on-demand") as served:
        config = small_config(dataset="served", source={"num_problems": 8, "seed": 0})
        deadline = time.monotonic() + 120
        run = None
        while run is None:  # the deployment exists once `serve` has registered it
            try:
                run = run_deployment("build_dataset/build-on-demand", parameters={"config": config.model_dump(mode="json")},
                                     timeout=0)
            except Exception:
                if time.monotonic() > deadline or served.proc.poll() is not None:
                    raise
                time.sleep(1)
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline + 300:
                state = client.read_flow_run(run.id).state
                if state.is_final():
                    break
                assert served.proc.poll() is None, "stepforge serve exited while the run was pending"
                time.sleep(1)
        assert state.is_completed(), state
        assert list_versions(open_store(str(tmp_path / "data")), "served") == [1]
    assert "build-on-demand" in served.out  # serve's start message names what it serves


@pytest.mark.slow
def test_shards_fan_out_to_stepforge_serve(prefect_server, small_config, tmp_path, monkeypatch):
    """`concurrency.runner=deployments` without a pool: `stepforge serve` runs each shard as a subprocess."""
    import uuid

    from prefect.client.orchestration import get_client

    from flows.build import build_dataset

    # A deployment name of this test's own: serving `build-shard` itself would take test_worker's deployment of
    # it (`prefect deploy --all`, on the `stepforge` pool) off that pool for the rest of the session.
    name = f"build-shard-served-{uuid.uuid4().hex[:8]}"
    with stepforge_serve(tmp_path, name, renamed_from="build-shard") as served:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:  # the deployment exists once `serve` has registered it
                try:
                    client.read_deployment_by_name(f"build_shard/{name}")
                    break
                except Exception:
                    assert served.proc.poll() is None and time.monotonic() < deadline, f"serve did not register {name}"
                    time.sleep(1)
        # A relative root: shard runs start in serve's working folder (not this one), so the build hands them
        # an absolute root.
        (tmp_path / "flow").mkdir()
        monkeypatch.chdir(tmp_path / "flow")
        fanned = build_dataset(small_config(dataset="served-shards", storage={"root": "fanned-data"},
                                            concurrency={"runner": "deployments", "shards": 2,
                                                         "deployment": f"build_shard/{name}"}))
        threads = build_dataset(small_config(dataset="served-shards", storage={"root": str(tmp_path / "threads")}))
        assert fanned["content_hash"] == threads["content_hash"]
        assert fanned["location"].startswith(str(tmp_path / "flow" / "fanned-data"))
        assert not (tmp_path / "fanned-data").exists()


@pytest.mark.slow
def test_serve_takes_over_a_deployment_registered_on_a_work_pool(prefect_server, small_config, tmp_path):
    """A deployment that already exists on a work pool (the worker route's `prefect deploy`), then served by
    `stepforge serve`: serve clears the pool, so a run started through the API executes in the serve process
    instead of waiting for a worker that nobody runs."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    name, pool = f"build-pooled-{uuid.uuid4().hex[:8]}", f"unpolled-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:  # what `prefect deploy` registers for prefect.yaml's entry
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        deployment_id = client.create_deployment(
            client.create_flow_from_name("build_dataset"), name, work_pool_name=pool,
            entrypoint="flows/build.py:build_dataset", job_variables={},
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $STEPFORGE_HOME }}"}}])
        before = client.read_deployment(deployment_id)
    assert before.work_pool_name == pool and before.work_queue_id is not None
    with stepforge_serve(tmp_path, name, renamed_from="build-on-demand") as served:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            # Serve updates the deployment in two steps (its path, then the registration): wait for the last.
            while (dep := client.read_deployment(deployment_id)).work_pool_name is not None:
                assert served.proc.poll() is None and time.monotonic() < deadline, f"serve did not take {name} off {pool}"
                time.sleep(1)
            # The same deployment (its runs' history stays), without a pool, pull steps or a missing folder.
            assert dep.work_queue_id is None and not dep.pull_steps and dep.path is not None
            config = small_config(dataset="taken-over", source={"num_problems": 8, "seed": 0})
            run = run_deployment(f"build_dataset/{name}", parameters={"config": config.model_dump(mode="json")},
                                 timeout=0)
            assert run.work_queue_id is None
            deadline = time.monotonic() + 300
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert served.proc.poll() is None, "stepforge serve exited while the run was pending"
                assert time.monotonic() < deadline, f"the run is still {state.name}: nobody picked it up"
                time.sleep(1)
        assert state.is_completed(), state
        assert list_versions(open_store(str(tmp_path / "data")), "taken-over") == [1]
    assert "work pool" in served.out and pool in served.out  # serve says it took the deployment off its pool
