"""The `publish_dataset` Prefect flow: build the Hub folder of a release, then upload and tag it.

Two tasks: building the folder is deterministic local work; the upload is network I/O and the only one
with retries. The Hub token is read by huggingface_hub from the environment inside the task, never
passed as a parameter, so it stays out of Prefect's run records and logs.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow, get_run_logger, task

from storage.hub import build_hub_folder, upload_folder_to_hub, validate_repo_id
from storage.objectstore import open_store
from storage.release import latest_version, parse_ref


@task(name="build-hub-folder")
def build_folder_task(ref: str, repo: str, root: str, endpoint_url: str | None, profile: str | None,
                      exports: dict[str, dict[str, Any]] | None, folder: str, license: str) -> dict[str, Any]:
    store = open_store(root, endpoint_url=endpoint_url, profile=profile)
    dataset, version = parse_ref(ref)
    assert version is not None  # resolved by the flow
    return build_hub_folder(store, dataset, version, folder, repo_id=repo, exports=exports, license=license)


@task(name="upload-to-hub", retries=2, retry_delay_seconds=[5, 30])
def upload_task(folder: str, repo: str, version: int, private: bool) -> dict[str, Any]:
    return upload_folder_to_hub(folder, repo_id=repo, version=version, private=private)


@flow(name="publish_dataset", log_prints=True)
def publish_dataset(ref: str, repo: str, root: str = "./stepforge-data", endpoint_url: str | None = None,
                    profile: str | None = None, private: bool = False,
                    exports: dict[str, dict[str, Any]] | None = None, folder: str | None = None,
                    dry_run: bool = False, license: str = "apache-2.0") -> dict[str, Any]:
    """Publish `NAME@vN` (latest when no version) to the Hub dataset repo `repo`, tagged `vN`."""
    validate_repo_id(repo)
    dataset, version = parse_ref(ref)
    if version is None:
        version = latest_version(open_store(root, endpoint_url=endpoint_url, profile=profile), dataset)
        if version is None:
            from storage.errors import StorageError

            raise StorageError(f"dataset {dataset!r} has no committed version under {root}.", field="dataset", value=dataset)
    folder = folder or tempfile.mkdtemp(prefix=f"stepforge-hub-{dataset}-v{version}-")
    summary = build_folder_task(f"{dataset}@v{version}", repo, root, endpoint_url, profile, exports, folder, license)
    if dry_run:
        return {**summary, "tag": None, "commit": None}
    uploaded = upload_task(folder, repo, version, private)
    get_run_logger().info("published %s@v%d to %s (tag %s)", dataset, version, repo, uploaded["tag"])
    return {**summary, **uploaded}
