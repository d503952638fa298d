"""Publishing a release on the Hugging Face Hub: a folder with one Parquet config per export and a card
generated from the manifest, uploaded with ``huggingface_hub`` in one commit and tagged ``v<N>``.

The token comes from ``HF_TOKEN`` / the login cache (or is passed in memory); it is handed to
``HfApi`` only and never written to the folder, the card, a manifest or a log line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from storage.card import render_hub_card
from storage.errors import ConfigError, StorageError
from storage.exports import EXPORTERS, run_export
from storage.exports.base import load_release
from storage.objectstore import ObjectStore, open_store
from storage.release import read_manifest

__all__ = ["build_hub_folder", "upload_folder_to_hub", "validate_repo_id"]

_MARKER = ".stepforge-hub"


def validate_repo_id(repo_id: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", repo_id or "") or ".." in repo_id:
        raise ConfigError(f"`repo` must look like org/name (letters, digits, '-', '_', '.'), got {repo_id!r}.", field="repo", value=repo_id)
    return repo_id


def build_hub_folder(
    store: ObjectStore,
    dataset: str,
    version: int,
    folder: str | Path,
    *,
    repo_id: str,
    exports: dict[str, dict[str, Any]] | None = None,
    license: str = "apache-2.0",
    keep_empty: bool = False,
) -> dict[str, Any]:
    """Write ``folder/<config>/train-00000.parquet`` per export plus ``README.md``; return a summary.

    ``exports`` maps format → options (default: every format with its default options). Exports with no
    rows (e.g. preference formats of a release without pairs) are left out unless ``keep_empty``, and the
    card says so, since an empty config only confuses the Hub viewer.
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        # A stale config from an earlier run must not be uploaded with this one, so the folder is rebuilt
        # from scratch; but only a folder this function made is ever deleted.
        if not (folder / _MARKER).is_file():
            raise ConfigError(f"{folder} exists and is not a stepforge Hub folder; give an empty or new folder.",
                              field="folder", value=str(folder))
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MARKER).write_text("built by stepforge; rebuilt on each publish\n")
    manifest = read_manifest(store, dataset, version)
    data = load_release(store, dataset, version)
    chosen = exports if exports is not None else {name: {} for name in EXPORTERS}
    records, skipped = [], []
    for fmt, options in chosen.items():
        exporter = EXPORTERS.get(fmt)
        out = folder / (exporter.config_name if exporter else fmt)
        record = run_export(store, dataset, version, fmt, open_store(str(out)), options, data=data)
        if record["rows"] == 0 and not keep_empty:
            shutil.rmtree(out)
            skipped.append(fmt)
            continue
        # The per-export card/record are superseded by the repository card; keep only the data files.
        (out / "README.md").unlink()
        (out / "export.json").unlink()
        (out / "data" / "train-00000.parquet").rename(out / "train-00000.parquet")
        (out / "data").rmdir()
        records.append(record)
    if not records:
        raise StorageError(f"{dataset}@v{version} has no rows in any of the exports {sorted(chosen)}; nothing to publish.",
                           field="exports", value=sorted(chosen))
    card = render_hub_card(manifest, records, repo_id=repo_id, license=license)
    if skipped:
        card += "\nNot published (no rows in this release): " + ", ".join(f"`{s}`" for s in skipped) + ".\n"
    (folder / "README.md").write_text(card, encoding="utf-8")
    return {"folder": str(folder), "configs": [r["config_name"] for r in records], "skipped": skipped,
            "rows": {r["config_name"]: r["rows"] for r in records}}


def upload_folder_to_hub(
    folder: str | Path,
    *,
    repo_id: str,
    version: int,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Create the dataset repo if needed, upload ``folder`` in one commit and tag that commit ``v<version>``."""
    from huggingface_hub import HfApi

    import os

    validate_repo_id(repo_id)
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import), so a deployment or a test can
    # point a long-lived process at a mirror or a local Hub.
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                               commit_message=f"stepforge: publish v{version}", ignore_patterns=[_MARKER])
    tag = f"v{version}"
    api.create_tag(repo_id, tag=tag, repo_type="dataset", revision=commit.oid,
                   tag_message=f"stepforge release v{version}")
    return {"repo_id": repo_id, "commit": commit.oid, "tag": tag, "url": commit.commit_url}
