"""Hub publishing: the folder (one Parquet config per export + a card from the manifest) validates with
DatasetCard.load and load_dataset, and the upload is checked at the HTTP layer against a fake Hub on
loopback (create repo, one commit with every file, tag vN, token only in the Authorization header)."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from hub_fixtures import fake_hub  # noqa: F401  (fixture)
from storage.errors import ConfigError
from storage.hub import build_hub_folder, upload_folder_to_hub, validate_repo_id
from storage.objectstore import StorageConfig, open_store
from test_exports import _commit

TOKEN = "hf_fakeTOKENdoNOTleak1234567890"


@pytest.fixture
def release(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _commit(store)
    return store


def test_hub_folder_has_one_config_per_export_and_a_valid_card(release, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    folder = tmp_path / "hub"
    summary = build_hub_folder(release, "demo", 1, folder, repo_id="org/demo-prm",
                               exports={"trl-prm": {"threshold": 0.5}, "step-dpo": {}, "prm800k": {}, "trl-dpo": {"kinds": ["ranked"]}})
    assert summary["configs"] == ["trl_prm", "step_dpo", "prm800k"] and summary["skipped"] == ["trl-dpo"]
    card = DatasetCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert [c["config_name"] for c in data["configs"]] == ["trl_prm", "step_dpo", "prm800k"]
    assert data["configs"][0]["data_files"] == [{"split": "train", "path": "trl_prm/train-*.parquet"}]
    assert data["license"] == "apache-2.0" and "stepforge" in data["tags"] and data["size_categories"] == ["n<1K"]
    text = card.text
    assert "\"threshold\": 0.5" in text and "seed: `7`" in text and "Step-DPO" in text and "Let's Verify" in text
    assert "`trl-dpo`" in text  # the skipped export is named
    for config, rows in summary["rows"].items():
        ds = load_dataset(str(folder), config, split="train", cache_dir=str(tmp_path / "hf"))
        assert len(ds) == rows > 0
    ds = load_dataset(str(folder), "trl_prm", split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == ["prompt", "completions", "labels"] and ds[0]["labels"] == [True, True]


def test_upload_creates_repo_commits_every_file_and_tags_the_version(release, tmp_path, fake_hub):
    folder = tmp_path / "hub"
    build_hub_folder(release, "demo", 1, folder, repo_id="org/demo-prm", exports={"trl-prm": {}, "math-shepherd": {}})
    result = upload_folder_to_hub(folder, repo_id="org/demo-prm", version=1, private=True, token=TOKEN, endpoint=fake_hub.url)
    repo = fake_hub.repos["org/demo-prm"]
    assert repo["visibility"] == "private" and repo["type"] == "dataset"
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".stepforge-hub"}
    assert repo["files"] == local  # byte for byte, in one commit
    assert len(repo["commits"]) == 1 and repo["tags"] == {"v1": result["commit"]} and result["tag"] == "v1"
    assert pq.read_table(io.BytesIO(repo["files"]["trl_prm/train-00000.parquet"])).column_names == ["prompt", "completions", "labels"]
    calls = fake_hub.paths()
    assert calls[:2] == ["GET /api/datasets/org/demo-prm", "POST /api/repos/create"]  # checked, then created
    assert any(c.startswith("POST /api/datasets/org/demo-prm/commit/main") for c in calls)
    assert calls[-1] == f"POST /api/datasets/org/demo-prm/tag/{result['commit']}"
    for r in fake_hub.requests:
        if r.path.startswith(("/api/repos/", "/api/datasets/")):
            assert r.headers.get("authorization") == f"Bearer {TOKEN}"
        assert TOKEN.encode() not in r.body  # the token travels in the header only
    assert not any(TOKEN.encode() in b for b in local.values())


@pytest.mark.parametrize("repo", ["demo", "org/../x", "/x", "org/na me", "a/b/c"])
def test_bad_repo_ids_are_refused(repo):
    with pytest.raises(ConfigError, match="`repo`"):
        validate_repo_id(repo)


def test_hub_folder_never_deletes_a_folder_it_did_not_make(release, tmp_path):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a stepforge Hub folder"):
        build_hub_folder(release, "demo", 1, mine, repo_id="org/demo", exports={"trl-prm": {}})
    assert (mine / "notes.txt").read_text() == "keep me"
    folder = tmp_path / "hub"
    build_hub_folder(release, "demo", 1, folder, repo_id="org/demo", exports={"trl-prm": {}, "math-shepherd": {}})
    build_hub_folder(release, "demo", 1, folder, repo_id="org/demo", exports={"trl-prm": {}})  # rebuilt, not merged
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["trl_prm"]


def test_private_is_refused_for_an_existing_public_repo_before_any_upload(release, tmp_path, fake_hub):
    fake_hub.add_repo("org/open", private=False)
    folder = tmp_path / "hub"
    build_hub_folder(release, "demo", 1, folder, repo_id="org/open", exports={"trl-prm": {}})
    with pytest.raises(ConfigError, match="org/open already exists and is public"):
        upload_folder_to_hub(folder, repo_id="org/open", version=1, private=True, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos["org/open"]["files"] == {} and not any(r.method == "POST" for r in fake_hub.requests)
    # Without --private the public repo is used as it is; a private repo stays private.
    assert upload_folder_to_hub(folder, repo_id="org/open", version=1, token=TOKEN, endpoint=fake_hub.url)["tag"] == "v1"
    fake_hub.add_repo("org/closed", private=True)
    assert upload_folder_to_hub(folder, repo_id="org/closed", version=1, private=True, token=TOKEN, endpoint=fake_hub.url)["tag"] == "v1"


def test_republishing_a_tagged_version_uploads_nothing(release, tmp_path, fake_hub):
    folder = tmp_path / "hub"
    build_hub_folder(release, "demo", 1, folder, repo_id="org/demo", exports={"trl-prm": {}})
    first = upload_folder_to_hub(folder, repo_id="org/demo", version=1, token=TOKEN, endpoint=fake_hub.url)
    n_requests = len(fake_hub.requests)
    again = upload_folder_to_hub(folder, repo_id="org/demo", version=1, token=TOKEN, endpoint=fake_hub.url)
    assert again["already_published"] and again["commit"] == first["commit"] and not first["already_published"]
    repo = fake_hub.repos["org/demo"]
    assert len(repo["commits"]) == 1 and repo["tags"] == {"v1": first["commit"]}
    assert all(r.method == "GET" for r in fake_hub.requests[n_requests:])  # only the checks ran


def test_a_bad_export_name_creates_no_path(release, tmp_path):
    folder = tmp_path / "hub" / "inner"
    with pytest.raises(ConfigError, match="`format` must be one of"):
        build_hub_folder(release, "demo", 1, folder, repo_id="org/demo", exports={"trl-prm": {}, "../../evil": {}})
    assert not (tmp_path / "evil").exists() and not (tmp_path / "hub").exists()


@pytest.mark.usefixtures("prefect_server")
def test_cli_publish_refuses_private_on_public_repo_and_skips_a_published_version(release, tmp_path, fake_hub, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.publish import publish_dataset

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    fake_hub.add_repo("org/open", private=False)
    base = ["datasets", "--root", release.root, "publish", "demo@v1", "--export", "trl-prm"]
    res = CliRunner().invoke(app, base + ["--repo", "org/open", "--private", "--folder", str(tmp_path / "h1")])
    assert res.exit_code == 2 and "already exists and is public" in res.output, res.output
    assert not (tmp_path / "h1").exists() and fake_hub.repos["org/open"]["commits"] == []  # refused before any work
    res = CliRunner().invoke(app, base + ["--repo", "org/new", "--folder", str(tmp_path / "h2")])
    assert res.exit_code == 0 and "published demo@v1 to org/new (tag v1" in res.output, res.output
    res = CliRunner().invoke(app, base + ["--repo", "org/new", "--folder", str(tmp_path / "h3")])
    assert res.exit_code == 0 and "already published to org/new" in res.output, res.output
    assert len(fake_hub.repos["org/new"]["commits"]) == 1 and not (tmp_path / "h3").exists()
    # The flow itself (as a deployment runs it) skips a published version too, without building a folder.
    again = publish_dataset(ref="demo@v1", repo="org/new", storage=StorageConfig(root=release.root),
                            exports={"trl-prm": {}}, folder=str(tmp_path / "h5"))
    assert again["already_published"] and again["tag"] == "v1" and not (tmp_path / "h5").exists()
    with pytest.raises(ConfigError, match="already exists and is public"):
        publish_dataset(ref="demo@v1", repo="org/open", storage=StorageConfig(root=release.root), private=True,
                        folder=str(tmp_path / "h6"))
    assert len(fake_hub.repos["org/new"]["commits"]) == 1 and fake_hub.repos["org/open"]["commits"] == []
    res = CliRunner().invoke(app, ["datasets", "--root", release.root, "publish", "demo@v1", "--repo", "org/x",
                                   "--export", "../evil", "--folder", str(tmp_path / "h4" / "in")])
    assert res.exit_code == 2 and "`format` must be one of" in res.output and not (tmp_path / "h4").exists()
