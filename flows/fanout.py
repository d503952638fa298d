"""Shards as deployment runs (`concurrency.runner=deployments`), for teams with Prefect workers on several
machines.

The build flow stages every shard's input in the store, then starts one run of the `build-shard` deployment
(prefect.yaml) per unfinished shard, `concurrency.shards` at a time; whichever worker of the pool is free
picks each up. A shard run does exactly what a shard task does in-process (`run_shard_task`): it reads its
input from staging, searches, and journals its tables and counters in staging. The parent never reads a
child's Prefect result (that lives on the worker's disk): it reads the journal, waits until every shard is
staged, and commits. A crash anywhere leaves finished shards staged, so a rerun resumes as with threads.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable
from uuid import UUID

from prefect import flow

from flows.config import BuildConfig
from storage.errors import ConfigError, StepforgeError
from tasks.stats import BuildStats

if TYPE_CHECKING:
    from flows.build import _Shard

_POLL_S = 2.0  # how often the parent reads its shard runs' states


def _not_started(run: Any) -> bool:
    """Whether no worker has taken the run yet: Scheduled (Late is a Scheduled state) or Pending."""
    from prefect.client.schemas.objects import StateType

    return run.state is None or run.state.type in (StateType.SCHEDULED, StateType.PENDING)


def _cancel(client: Any, run_id: UUID) -> None:
    from prefect.states import Cancelled

    try:
        client.set_flow_run_state(run_id, Cancelled(message="not started within concurrency.shard_start_timeout_s"),
                                  force=True)
    except Exception:  # the build fails either way; a run left Scheduled is only picked up by a later worker
        pass


class ShardRunError(StepforgeError):
    """A shard run of the build-shard deployment ended without staging its shard."""


def _shard_run_name() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    p = ctx.parameters if ctx is not None else {}
    cfg = p.get("config")
    dataset = cfg.dataset if isinstance(cfg, BuildConfig) else (cfg or {}).get("dataset", "?")
    return f"shard {p.get('index', 0) + 1}/{p.get('count', '?')} of {dataset}"


@flow(name="build_shard", flow_run_name=_shard_run_name, log_prints=True)
def build_shard(config: BuildConfig, build_key: str, shard_key: str, index: int = 0, count: int = 1) -> dict[str, Any]:
    """Search one staged shard of a build and journal its output in staging (a run of the build-shard
    deployment, started by a build with `concurrency.runner=deployments`). Returns the shard's counters."""
    from flows.build import log_shard_done, run_shard_task

    from prefect import get_run_logger

    # Recomputed unless journalled: Prefect's cached result may sit on another worker's disk.
    stats = run_shard_task.with_options(refresh_cache=True)(config, build_key, shard_key, index)
    log_shard_done(get_run_logger(), index, count, stats, resumed=False)
    return stats.to_dict()


def run_shards_as_deployments(config: BuildConfig, build_key: str, shards: list["_Shard"], staged: list[bool], *,
                              on_done: Callable[[int, BuildStats], None], tick: Callable[[bool], None]) -> list[BuildStats]:
    """Run every unstaged shard as a run of `config.concurrency.deployment`, at most `concurrency.shards` at
    once; call `on_done(index, stats)` as each is staged (resumed ones first) and `tick(all_done)` every poll.
    A shard run that ends in any state but Completed fails the build, naming the run and its state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    from prefect.exceptions import ObjectNotFound

    from flows.build import _stats_key, for_workers
    from flows.components import open_config_store

    store = open_config_store(config)
    results: dict[int, BuildStats] = {}

    def journalled(i: int) -> BuildStats:
        return BuildStats.from_dict(json.loads(store.read_bytes(_stats_key(config, build_key, shards[i].key))))

    for i, was_staged in enumerate(staged):
        if was_staged:
            results[i] = journalled(i)
            on_done(i, results[i])
    todo = [i for i in range(len(shards)) if i not in results]
    # A relative root would resolve against each worker's working directory.
    params = for_workers(config).model_dump(mode="json")
    running: dict[UUID, int] = {}
    names: dict[UUID, str] = {}
    created: dict[UUID, float] = {}  # monotonic time each run was created, for `shard_start_timeout_s`
    failed: ShardRunError | None = None
    pool = "(none)"
    with get_client(sync_client=True) as client:
        if todo:
            try:  # before any shard: a server without the deployment (the CLI's own temporary one) has no workers
                pool = client.read_deployment_by_name(config.concurrency.deployment).work_pool_name or "(none)"
            except ObjectNotFound:
                raise ConfigError(
                    f"`concurrency.runner` is deployments, but the Prefect server at {client.api_url} has no "
                    f"deployment {config.concurrency.deployment!r}: register prefect.yaml's with `prefect deploy "
                    f"--all` and start a worker on its pool (or run `stepforge serve`), with PREFECT_API_URL "
                    f"pointing at that server.", field="concurrency.deployment",
                    value=config.concurrency.deployment) from None
        while todo or running:
            while todo and len(running) < config.concurrency.shards:
                i = todo.pop(0)
                run = run_deployment(
                    config.concurrency.deployment, timeout=0, as_subflow=True,
                    parameters={"config": params, "build_key": build_key, "shard_key": shards[i].key,
                                "index": i, "count": len(shards)},
                    flow_run_name=f"shard {i + 1}/{len(shards)} of {config.dataset}")
                running[run.id] = i
                names[run.id] = run.name
                created[run.id] = time.monotonic()
            time.sleep(_POLL_S)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(running))))
            stuck = [r for r in runs if _not_started(r) and
                     time.monotonic() - created[r.id] > config.concurrency.shard_start_timeout_s]
            if stuck:
                # Nobody polls the deployment: without a deadline the build would wait forever. Cancel every
                # run not started yet (a worker appearing later must not run shards the rerun starts again);
                # runs already started finish and stage as after a failed shard.
                todo.clear()
                failed = failed or ShardRunError(
                    f"{len(stuck)} shard run(s) of deployment {config.concurrency.deployment} (work pool "
                    f"{pool}) still {stuck[0].state.name} after concurrency.shard_start_timeout_s="
                    f"{config.concurrency.shard_start_timeout_s:g} s: no worker is polling that pool (or, without "
                    f"a pool, no `stepforge serve` serves it); start one, or raise the timeout, and rerun the "
                    f"build to resume (shards already staged are kept).",
                    field="concurrency.shard_start_timeout_s", value=config.concurrency.shard_start_timeout_s)
                for run in [r for r in runs if _not_started(r)]:
                    _cancel(client, run.id)
                    running.pop(run.id)
                runs = [r for r in runs if r.id in running]
            for run in sorted(runs, key=lambda r: running[r.id]):
                if run.state is None or not run.state.is_final():
                    continue
                i = running.pop(run.id)
                if not run.state.is_completed():
                    # Start no more shards, but let the running ones finish and stage: the rerun resumes them.
                    todo.clear()
                    message = (run.state.message or "").strip().splitlines()
                    failed = failed or ShardRunError(
                        f"Shard {i + 1}/{len(shards)} ran as flow run {names[run.id]!r} ({run.id}) of "
                        f"{config.concurrency.deployment} and ended {run.state.name}"
                        + (f": {message[0]}" if message else "")
                        + "; rerun the build to resume (shards already staged are kept).",
                        field="concurrency.runner", value="deployments")
                    continue
                results[i] = journalled(i)
                on_done(i, results[i])
            tick(not todo and not running and failed is None)
    if failed is not None:
        raise failed
    return [results[i] for i in range(len(shards))]
