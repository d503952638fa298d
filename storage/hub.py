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
from storage.exports import EXPORTERS, parse_options, run_export
from storage.exports.base import load_release
from storage.objectstore import ObjectStore, open_store
from storage.release import read_release

__all__ = ["build_hub_folder", "check_hub_target", "upload_folder_to_hub", "validate_repo_id"]

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
    chosen = exports if exports is not None else {name: {} for name in EXPORTERS}
    # Every format name and option is checked before any path is built from it: a name like `../x` must
    # be refused, not turned into a folder outside `folder`.
    parsed = {fmt: parse_options(fmt, options) for fmt, options in chosen.items()}
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
    manifest = read_release(store, dataset, version)
    data = load_release(store, dataset, version)
    records, skipped = [], []
    for fmt, options in parsed.items():
        out = folder / EXPORTERS[fmt].config_name
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


def _api(token: str | None, endpoint: str | None) -> Any:
    import os

    from huggingface_hub import HfApi

    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import), so a deployment or a test can
    # point a long-lived process at a mirror or a local Hub.
    return HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)


def check_hub_target(
    repo_id: str,
    *,
    version: int,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """What publishing ``v<version>`` to ``repo_id`` would meet, checked before anything is uploaded.

    Returns ``{"exists", "private", "published_commit"}``; ``published_commit`` is the commit the tag
    ``v<version>`` already points at (``None`` when the version is not yet published). Raises
    ``ConfigError`` when ``private`` is asked for a repo that exists and is public: creating the repo is
    the only moment its visibility is set here, and uploading into a public repo would publish the data.
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    validate_repo_id(repo_id)
    api = _api(token, endpoint)
    try:
        info = api.repo_info(repo_id, repo_type="dataset")
    except RepositoryNotFoundError:
        return {"exists": False, "private": None, "published_commit": None}
    if private and not info.private:
        raise ConfigError(f"`private` was asked for, but the Hub dataset repo {repo_id} already exists and is public; "
                          "nothing was uploaded. Make the repo private in its settings on the Hub, or publish to a new repo.",
                          field="private", value=True)
    tag = f"v{version}"
    refs = api.list_repo_refs(repo_id, repo_type="dataset")
    published = next((t.target_commit for t in refs.tags if t.name == tag), None)
    return {"exists": True, "private": bool(info.private), "published_commit": published}


def upload_folder_to_hub(
    folder: str | Path,
    *,
    repo_id: str,
    version: int,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Create the dataset repo if needed, upload ``folder`` in one commit and tag that commit ``v<version>``.

    Checked first (``check_hub_target``): a public repo when ``private`` is asked is refused, and a version
    whose tag already exists is not uploaded again (``already_published`` in the result), so a republish
    never leaves an untagged commit behind on the Hub.
    """
    validate_repo_id(repo_id)
    tag = f"v{version}"
    target = check_hub_target(repo_id, version=version, private=private, token=token, endpoint=endpoint)
    if target["published_commit"]:
        return {"repo_id": repo_id, "commit": target["published_commit"], "tag": tag, "url": None, "already_published": True}
    api = _api(token, endpoint)
    if not target["exists"]:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                               commit_message=f"stepforge: publish v{version}", ignore_patterns=[_MARKER])
    api.create_tag(repo_id, tag=tag, repo_type="dataset", revision=commit.oid,
                   tag_message=f"stepforge release v{version}")
    return {"repo_id": repo_id, "commit": commit.oid, "tag": tag, "url": commit.commit_url, "already_published": False}
