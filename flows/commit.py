"""The commit step both flows end with (`build_dataset`'s `commit-release`, `mustard_dataset`'s
`commit-mustard`): publish the staged shards as the next version, sync the catalog, release staging and
emit `stepforge.version.committed`. One place, so the two flows commit, announce and retry alike; each
passes its own card (and, for the event, its algorithm)."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.events import emit_event

from storage.catalog import Catalog, CatalogWarning
from storage.lease import release_staging
from storage.objectstore import ObjectStore, StorageConfig
from storage.release import commit_release


def run_commit_token() -> str | None:
    """This flow run's id (the same across task retries and flow retries), so a retried commit returns the
    version an earlier attempt made; None outside Prefect (``task.fn``): no run to key on, no idempotency."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    run = ctx.task_run if ctx is not None else None
    return str(run.flow_run_id or run.id) if run is not None else None


def commit_and_announce(store: ObjectStore, storage: StorageConfig, dataset: str, *, build_key: str,
                        shard_keys: list[str], manifest_fields: dict[str, Any],
                        card: str | Callable[[dict[str, Any]], str], commit_token: str | None,
                        staging_holder: str | None, event_payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit, sync the catalog, drop this run's staging lease, emit the event; returns the manifest.
    Safe to retry as a whole when `commit_token` is set (see `storage.release.commit_release`)."""
    manifest = commit_release(store, dataset, build_key=build_key, shard_keys=shard_keys,
                              manifest_fields=manifest_fields, card=card, commit_token=commit_token)
    catalog = Catalog.for_store(store, storage.catalog)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CatalogWarning)
        catalog.sync(store)
    for w in caught:  # a damaged old release never fails this commit: it is left out and named
        get_run_logger().warning("%s", w.message)
    # The release now holds the data; the staging folder goes only when no other run of the config holds it.
    release_staging(store, dataset, build_key, staging_holder)
    # Automations (e.g. the publish deployment in prefect.yaml) trigger on this event. It carries the store's
    # settings whole (endpoint, region, profile and block *names*; never keys), so a publish run opens the
    # release exactly as the run did.
    emit_event(event="stepforge.version.committed",
               resource={"prefect.resource.id": f"stepforge.dataset.{dataset}",
                         "stepforge.dataset": dataset, "stepforge.version": str(manifest["version"])},
               payload={"dataset": dataset, "version": manifest["version"], "content_hash": manifest["content_hash"],
                        **(event_payload or {}),
                        "storage": storage.model_copy(update={"root": store.root}).model_dump(mode="json")})
    return manifest


class ProgressArtifact:
    """A Prefect progress artifact a run refreshes while it works. Progress is for people watching, so a
    failed update never fails the run, and is logged once: an API that is down would otherwise say so at
    every poll."""

    def __init__(self, key: str, description: str) -> None:
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.warned = False

    def update(self, percent: float) -> None:
        try:
            update_progress_artifact(self.id, percent)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            if not self.warned:
                get_run_logger().warning("progress artifact not updated (further failures not logged): %s", exc)
            self.warned = True


def artifact_key(dataset: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for `what` of `dataset`."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{dataset}-{what}".lower()).strip("-")
