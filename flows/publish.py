"""The `publish_dataset` Prefect flow: check the Hub target, build the Hub folder of a release, then upload
and tag it.

Three tasks: the check (does the repo exist, is it public although `private` was asked, is `vN` already
tagged) runs before any work; building the folder is deterministic local work; the upload is network I/O.
Only the network tasks retry, and never on a stepforge error (a refused target stays refused). Secrets
never travel as parameters, so they stay out of Prefect's run records and logs: the Hub token is read by
huggingface_hub from the environment inside the task, and S3 keys come from the environment, a profile or
a Prefect block named by the `storage` settings (`storage.credentials_block`) and resolved inside each task.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow, get_run_logger, task

from storage.errors import StepforgeError, StorageError
from storage.exports import get_exporter
from storage.hub import build_hub_folder, check_hub_target, upload_folder_to_hub, validate_repo_id
from flows.stores import open_root
from storage.objectstore import StorageConfig
from storage.release import latest_version, parse_ref


def _retry_unless_user_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry network failures, not stepforge's own refusals (a public repo, a bad name): those would fail
    the same way after every delay."""
    data = getattr(state, "data", None)  # the engine hands the exception in as the Failed state's data
    exc = data if isinstance(data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, StepforgeError)


@task(name="check-hub-target", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_user_error)
def check_target_task(repo: str, version: int, private: bool) -> dict[str, Any]:
    return check_hub_target(repo, version=version, private=private)


@task(name="build-hub-folder")
def build_folder_task(ref: str, repo: str, storage: StorageConfig, exports: dict[str, dict[str, Any]] | None,
                      folder: str, license: str) -> dict[str, Any]:
    store = open_root(storage)  # keys from the storage's block are read here, inside the task, in memory only
    dataset, version = parse_ref(ref)
    if version is None:  # the flow always resolves it; a direct caller gets an error, not an assert
        raise StorageError(f"`ref` must name a version (NAME@vN), got {ref!r}.", field="ref", value=ref)
    return build_hub_folder(store, dataset, version, folder, repo_id=repo, exports=exports, license=license)


@task(name="upload-to-hub", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_user_error)
def upload_task(folder: str, repo: str, version: int, private: bool) -> dict[str, Any]:
    return upload_folder_to_hub(folder, repo_id=repo, version=version, private=private)


@flow(name="publish_dataset", log_prints=True)
def publish_dataset(ref: str, repo: str, storage: StorageConfig | None = None, private: bool = False,
                    exports: dict[str, dict[str, Any]] | None = None, folder: str | None = None,
                    dry_run: bool = False, license: str = "apache-2.0") -> dict[str, Any]:
    """Publish `NAME@vN` (latest when no version) to the Hub dataset repo `repo`, tagged `vN`.

    `storage` says where the release lives, as the build's `storage` section does (default: the local
    `./stepforge-data`); its `credentials_block` names a Prefect block with the S3 keys of an `s3://` root
    (`aws-credentials/<name>` or `secret/<name>` holding JSON): only the name is a parameter. A version
    already tagged on the Hub is not uploaded again (the result says `already_published`).
    """
    storage = storage or StorageConfig()
    validate_repo_id(repo)
    for fmt in exports or {}:  # before any folder exists: a bad name must not create paths
        get_exporter(fmt)
    dataset, version = parse_ref(ref)
    if version is None:
        version = latest_version(open_root(storage), dataset)
        if version is None:
            raise StorageError(f"dataset {dataset!r} has no committed version under {storage.root}.", field="dataset",
                               value=dataset)
    logger = get_run_logger()
    if not dry_run:
        target = check_target_task(repo, version, private)
        if target["published_commit"]:
            logger.warning("%s@v%d is already published to %s (tag v%d -> %s); nothing uploaded", dataset, version,
                           repo, version, target["published_commit"][:12])
            return {"folder": None, "configs": [], "skipped": [], "rows": {}, "repo_id": repo,
                    "commit": target["published_commit"], "tag": f"v{version}", "url": None, "already_published": True}
    folder = folder or tempfile.mkdtemp(prefix=f"stepforge-hub-{dataset}-v{version}-")
    summary = build_folder_task(f"{dataset}@v{version}", repo, storage, exports, folder, license)
    if dry_run:
        return {**summary, "tag": None, "commit": None}
    uploaded = upload_task(folder, repo, version, private)
    logger.info("published %s@v%d to %s (tag %s)", dataset, version, repo, uploaded["tag"])
    return {**summary, **uploaded}
