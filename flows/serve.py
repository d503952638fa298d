"""`stepforge serve`: the deployments of prefect.yaml served from one long-running process.

For a small team without a work pool: Prefect's `serve` registers each deployment with the API (the same
names, parameters, schedules and triggers `prefect deploy --all` would create) and runs their flow runs
as subprocesses of this process, from the code it was started with. The worker route (`prefect deploy`
+ `prefect worker start --pool stepforge`) reads the same prefect.yaml, so both stay one description.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from storage.errors import ConfigError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def find_prefect_file(path: str | Path | None = None) -> Path:
    """The prefect.yaml to serve: ``path``, else ./prefect.yaml, else the one beside the stepforge packages."""
    candidates = [Path(path)] if path is not None else [Path.cwd() / "prefect.yaml", PROJECT_ROOT / "prefect.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"No prefect.yaml at {', '.join(str(c) for c in candidates)}; pass --prefect-file PATH "
                      "(the repository's prefect.yaml declares stepforge's deployments).",
                      field="--prefect-file", value=str(path) if path else None)


def _load_flow(entrypoint: str, base: Path) -> Any:
    """The flow an entrypoint names (``flows/build.py:build_dataset``): imported as a module when the file is
    part of an importable package (so served runs use the same code as everything else), else by path."""
    from prefect.flows import load_flow_from_entrypoint

    file, _, name = entrypoint.rpartition(":")
    module = file.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return load_flow_from_entrypoint(f"{base / file}:{name}")


def _schedules(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Prefect's own conversion of prefect.yaml schedule entries (cron/interval/rrule, timezone, active,
    # parameters), the one `prefect deploy` uses, so both routes schedule alike.
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    return [_schedule_config_to_deployment_schedule(dict(spec)) for spec in specs]


def _triggers(deployment_name: str, specs: list[dict[str, Any]]) -> list[Any]:
    from pydantic import TypeAdapter
    from prefect.events import DeploymentTriggerTypes

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    return [adapter.validate_python({"name": f"{deployment_name}__automation_{i}", **spec})
            for i, spec in enumerate(specs, start=1)]


def load_deployments(prefect_file: str | Path | None = None, names: list[str] | None = None) -> list["RunnerDeployment"]:
    """prefect.yaml's deployments as runner deployments without a work pool: registering one that already
    exists on a pool (the worker route's `prefect deploy`) takes it off that pool, so its runs go to the serve
    process. ``names`` keeps only those deployments; an unknown name is a config error listing the known ones."""
    path = find_prefect_file(prefect_file)
    spec = yaml.safe_load(path.read_text()) or {}
    declared = spec.get("deployments") or []
    known = [d["name"] for d in declared]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError(f"--deployment {', '.join(unknown)}: not in {path}; it declares {', '.join(known)}.",
                          field="--deployment", value=unknown[0])
    out = []
    for dep in declared:
        if names and dep["name"] not in names:
            continue
        flow = _load_flow(dep["entrypoint"], path.parent)
        deployment = flow.to_deployment(
            name=dep["name"],
            description=dep.get("description"),
            tags=dep.get("tags"),
            parameters=dep.get("parameters"),
            schedules=_schedules(dep.get("schedules") or []),
            triggers=_triggers(dep["name"], dep.get("triggers") or []),
            concurrency_limit=dep.get("concurrency_limit"),
        )
        # Set explicitly (not left unset): Prefect updates an existing deployment with the fields that were
        # set, so an unset pool keeps the one `prefect deploy` gave it; its runs would then go to that pool's
        # queue, for whichever of its workers polls first. An explicit None clears it, as `Flow.serve` does.
        deployment.work_pool_name = None
        deployment.work_queue_name = None
        out.append(deployment)
    return out


def take_over(deployments: list["RunnerDeployment"]) -> dict[str, str]:
    """Ready the deployments the Prefect API already has for serving; returns name -> work pool for those that
    were on a pool (serving them takes them off it).

    Prefect's re-registration updates the public fields only, not a deployment's `path`, the folder a served
    run loads its flow from. One registered by `prefect deploy` has none (its pull steps set the folder, and
    serving drops them), so its served runs would crash loading the flow from "None"; it gets serve's path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    pooled = {}
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                pooled[deployment.name] = existing.work_pool_name
            if existing.path != deployment._path:
                client.update_deployment(existing.id, DeploymentUpdate(path=deployment._path))
    return pooled
