"""Where shard tasks run (`concurrency.runner`): threads of the flow's process (the default), a Dask cluster
(`prefect-dask`) or a Ray cluster (`prefect-ray`).

A shard task takes only its config and storage keys (`flows.build.run_shard_task`): its problems are read
from the staged input in the store and its tables written back there, so any worker that can open the store
can run any shard, and the data does not depend on which one did. The engines themselves are Prefect's
integrations; this module only chooses one, says clearly which extra is missing, and tells worker
processes which Prefect API to report to.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from storage.errors import ConfigError

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from flows.config import ConcurrencyConfig

# runner -> (module it needs, the stepforge extra that installs it)
_NEEDS = {"dask": ("prefect_dask", "dask"), "ray": ("prefect_ray", "ray")}


def check_runner(config: "ConcurrencyConfig") -> None:
    """Raise ConfigError naming `concurrency.runner` and the extra to install when the chosen runner's
    integration is not installed. Run by the CLI's preflight and again where the runner is made (a
    deployment run may land on a machine with other packages)."""
    needs = _NEEDS.get(config.runner)
    if needs is None:
        return
    module, extra = needs
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"`concurrency.runner` is {config.runner!r}, but {module.replace('_', '-')} is not "
                          f"installed: install the extra with `pip install 'stepforge[{extra}]'`, or use "
                          f"`--set concurrency.runner=threads`.", field="concurrency.runner", value=config.runner)


def make_task_runner(config: "ConcurrencyConfig") -> "TaskRunner":
    """A fresh task runner for one build's shard tasks (enter it to start it)."""
    check_runner(config)
    if config.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.address is not None:
            return DaskTaskRunner(address=config.address)
        # One thread per worker process: a shard already runs its own asyncio scheduler, batching every
        # policy request of its trees, so more threads per process would only contend for the GIL.
        # No dashboard: its fixed port (8787) would clash between builds running side by side.
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": config.shards, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if config.runner == "ray":
        from prefect_ray import RayTaskRunner

        if config.address is not None:
            return RayTaskRunner(address=config.address)
        # A local Ray instance with as many CPU slots as shards: each shard task takes one, so at most
        # `shards` run at once. No dashboard: its fixed port (8265) would clash between builds side by side,
        # and its processes cost a small machine seconds of start-up.
        return RayTaskRunner(init_kwargs={"num_cpus": config.shards, "include_dashboard": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=config.shards)


def runs_in_this_process(config: "ConcurrencyConfig") -> bool:
    """Whether shard tasks run in the flow's own process (their progress events reach its listeners)."""
    return config.runner == "threads"


@contextmanager
def api_for_workers(config: "ConcurrencyConfig") -> Iterator[None]:
    """Pin the Prefect API URL in the settings that task runners send with each task.

    Without `PREFECT_API_URL` the flow talks to an ephemeral server it started itself; a worker process
    would start another one of its own (a second server on the same database) instead of reporting to the
    flow's. Workers of a remote cluster must reach the URL: give such builds a real server
    (`PREFECT_API_URL`), as `infra/` does."""
    if runs_in_this_process(config):
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    # Not entered: inside a flow this may be the run's own client, which must stay open.
    url = str(get_client(sync_client=True).api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
