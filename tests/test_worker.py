"""The worker route end to end: prefect.yaml's deployments registered with `prefect deploy --all` on the test
session's Prefect server, and a real `prefect worker start --pool stepforge` process executing the runs.

- a build started through the API as a run of `build-on-demand` commits a version;
- a build with `concurrency.runner=deployments` fans its shards out as runs of `build-shard`, which the
  worker picks up, and commits the content hash the thread runner gives for the same config;
- a shard run that fails fails the build with one line naming the run, and a rerun resumes to the same hash;
- a fan-out onto an S3 root (moto) whose keys the worker has in its environment keeps them out of the shard
  runs' parameters, the runs' logs and artifacts, and the manifest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from s3_fixtures import FAKE_KEY_ID, FAKE_SECRET, FAKE_SESSION, moto_server, s3_env, s3_root  # noqa: F401
from storage.objectstore import open_store
from storage.release import list_versions, read_manifest

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "stepforge"  # the pool prefect.yaml deploys to


def _env(s3_endpoint: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    # The S3 keys as a deployment gives them to its workers: in the environment (s3_fixtures' fake values,
    # which moto accepts), so the secret test can look for them where they must not appear.
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "STEPFORGE_HOME": str(REPO),
            "PYTHONPATH": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO", "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_SESSION_TOKEN": FAKE_SESSION, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}


@pytest.fixture(scope="module")
def worker(prefect_server, moto_server, tmp_path_factory):
    """prefect.yaml deployed to the session's server and one process worker polling its pool."""
    env = _env(moto_server)
    logs = tmp_path_factory.mktemp("worker")
    subprocess.run([PREFECT, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=env, cwd=REPO,
                   check=True, capture_output=True, timeout=180)
    deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, text=True,
                              capture_output=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(logs / "worker.log", "w+")
    proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--type", "process"], env=env,
                            cwd=logs, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        print(log.read()[-5000:])  # shown by pytest when a test of this module failed
        log.close()


def _wait(run_id, proc, timeout_s: float = 600):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert proc.poll() is None, "the worker exited while the run was pending"
            assert time.monotonic() < deadline, f"run still {run.state.name} after {timeout_s} s"
            time.sleep(1)


def test_a_run_started_through_the_api_is_executed_by_a_worker_and_commits(worker, small_config):
    from prefect.deployments import run_deployment

    config = small_config(dataset="worked", source={"num_problems": 8, "seed": 0})
    run = run_deployment("build_dataset/build-on-demand", parameters={"config": config.model_dump(mode="json")},
                         timeout=0)
    run = _wait(run.id, worker)
    assert run.state.is_completed(), run.state
    assert run.name == "build worked (math-shepherd, 8 problems)"
    assert list_versions(open_store(config.storage.root), "worked") == [1]


def test_shards_fan_out_as_deployment_runs_and_give_the_thread_runners_hash(worker, small_config, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.build import build_dataset

    fanned = small_config(dataset="fanned", concurrency={"runner": "deployments", "shards": 3})
    state = build_dataset(fanned, return_state=True)
    summary = state.result()
    threads = build_dataset(small_config(dataset="fanned", storage={"root": str(tmp_path / "threads")}))
    assert summary["content_hash"] == threads["content_hash"]
    assert (summary["steps"], summary["rollouts"]) == (threads["steps"], threads["rollouts"])
    assert list_versions(open_store(fanned.storage.root), "fanned") == [1]
    # Each shard was its own run of build-shard, a child of the build's run, executed by the worker.
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        deployment = client.read_deployment_by_name("build_shard/build-shard")
    assert sorted(c.name for c in children) == [f"shard {i}/3 of fanned" for i in (1, 2, 3)]
    assert all(c.deployment_id == deployment.id and c.state.is_completed() for c in children)
    assert all(c.work_pool_name == POOL for c in children)
    manifest = read_manifest(open_store(fanned.storage.root), "fanned", 1)
    assert manifest["shards"] == {"count": 3, "size": 8, "resumed": 0}


def test_a_failed_shard_run_fails_the_build_in_one_line_and_a_rerun_resumes(worker, small_config, tmp_path, monkeypatch):
    """A shard whose staged input is unreadable fails in the worker; the parent names that run and state.
    Repaired, the rerun resumes the shards already staged and commits the thread runner's hash."""
    from flows.build import build_dataset
    from flows.fanout import ShardRunError

    cfg = small_config(dataset="broken", concurrency={"runner": "deployments", "shards": 3})
    import flows.build as build

    real_stage_inputs = build.stage_inputs
    victim: dict[str, Path] = {}

    def stage_and_break(store, config, build_key, shards):
        staged = real_stage_inputs(store, config, build_key, shards)
        key = build.stage_key(config.dataset, build_key, shards[1].key, "input")
        path = Path(config.storage.root) / key
        victim["path"], victim["data"] = path, path.read_bytes()
        path.write_bytes(b"not parquet")
        return staged

    monkeypatch.setattr(build, "stage_inputs", stage_and_break)
    with pytest.raises(ShardRunError) as err:
        build_dataset(cfg)
    message = str(err.value)
    assert "\n" not in message and "shard 2/3 of broken" in message and "Failed" in message
    assert "rerun the build" in message
    assert list_versions(open_store(cfg.storage.root), "broken") == []

    monkeypatch.setattr(build, "stage_inputs", real_stage_inputs)
    victim["path"].write_bytes(victim["data"])
    summary = build_dataset(cfg)
    reference = build_dataset(small_config(dataset="broken", storage={"root": str(tmp_path / "ref")}))
    # The other two shards finished before the build failed: the rerun computes only the broken one.
    assert summary["shards_resumed"] == 2 and summary["content_hash"] == reference["content_hash"]


def test_s3_keys_from_the_environment_stay_out_of_shard_runs_logs_artifacts_and_manifest(worker, s3_root,
                                                                                          small_config):
    """The build and the worker read the keys from their environment; the shard runs get the root, never the
    keys. Everything Prefect stores about the runs (read back from its API) and the manifest are searched for
    the key values."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId)

    from flows.build import build_dataset

    cfg = small_config(dataset="keyed", storage={"root": s3_root}, source={"num_problems": 16, "seed": 0},
                       concurrency={"runner": "deployments", "shards": 2})
    state = build_dataset(cfg, return_state=True)
    summary = state.result()
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        runs = [client.read_flow_run(parent), *children]
        ids = [r.id for r in runs]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    # The shards ran on the worker against S3, with the keys of its environment (moto refuses none, but boto3
    # has nothing to sign with without them), and logged as they finished.
    assert len(children) == 2 and all(c.state.is_completed() for c in children)
    assert all(c.parameters["config"]["storage"]["root"] == s3_root for c in children)
    assert sum("shard" in log.message and "done" in log.message for log in logs) >= 2
    store = open_store(s3_root)
    manifest_keys = [k for k in store.list("keyed/") if k.endswith(".json")]
    places = {
        "flow runs (parameters, job variables, states)": "\n".join(r.model_dump_json() for r in runs),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(a.model_dump_json() for a in artifacts),
        "manifest": json.dumps(read_manifest(store, "keyed", summary["version"])),
        "release json files": "\n".join(store.read_bytes(k).decode() for k in manifest_keys),
    }
    assert places["artifacts"] and manifest_keys
    for secret in (FAKE_SECRET, FAKE_SESSION, FAKE_KEY_ID):
        for where, text in places.items():
            assert secret not in text, f"{secret[:12]}... found in the {where}"


def test_a_deployment_the_server_lacks_fails_before_any_shard(prefect_server, small_config):
    from flows.build import build_dataset
    from storage.errors import ConfigError

    cfg = small_config(dataset="nowhere", concurrency={"runner": "deployments", "deployment": "build_shard/nowhere"})
    with pytest.raises(ConfigError, match=r"no deployment 'build_shard/nowhere'.*prefect deploy --all") as err:
        build_dataset(cfg)
    assert err.value.field == "concurrency.deployment"


def test_shard_runs_nobody_starts_fail_the_build_after_the_start_timeout(prefect_server, small_config, tmp_path,
                                                                         monkeypatch):
    """A deployment whose work pool has no worker: its shard runs stay Scheduled/Late forever. The build fails
    after `concurrency.shard_start_timeout_s` with one line naming the pool and the deployment, and cancels the
    runs it started so that a worker appearing later does not run them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    import flows.fanout
    from flows.build import build_dataset
    from flows.fanout import ShardRunError

    monkeypatch.setattr(flows.fanout, "_POLL_S", 0.2)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"), overwrite=True)
        deployment_id = client.create_deployment(client.create_flow_from_name("build_shard"), "unpolled",
                                                 work_pool_name="nobody-polls")
    cfg = small_config(dataset="unpolled", concurrency={"runner": "deployments", "shards": 2,
                                                        "deployment": "build_shard/unpolled",
                                                        "shard_start_timeout_s": 3})
    started = time.monotonic()
    with pytest.raises(ShardRunError) as err:
        build_dataset(cfg)
    assert time.monotonic() - started < 120
    message = str(err.value)
    assert "\n" not in message and "nobody-polls" in message and "build_shard/unpolled" in message
    assert "shard_start_timeout_s=3 s" in message and err.value.field == "concurrency.shard_start_timeout_s"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
    assert len(runs) == 2 and all(r.state.is_cancelled() for r in runs)  # 2 at once, none started
    # The shards' inputs stay staged for the rerun.
    assert any((tmp_path / "data" / "unpolled" / "_staging").iterdir())
