"""Where S3 credentials come from: the environment, an AWS profile, or a Prefect block resolved inside the
process (never a config field); the endpoint from AWS_ENDPOINT_URL or the config. All against moto over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.errors import ConfigError
from storage.objectstore import S3Credentials, StorageConfig, open_store


def _no_env_keys(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_profile_credentials_reach_every_client(s3_root, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _no_env_keys(monkeypatch)
    creds = tmp_path / "credentials"
    creds.write_text("[minio]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = profile-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    store = open_store(StorageConfig(root=s3_root, profile="minio"))
    assert store.credentials() == S3Credentials("PROFILEKEY", "profile-secret")
    store.write_bytes("a/b.txt", b"hi")
    assert store.read_bytes("a/b.txt") == b"hi"
    fs, path = store.filesystem_path("t/x.parquet")  # pyarrow gets the profile's keys in memory
    pq.write_table(pa.table({"x": [1]}), path, filesystem=fs)
    assert store.list("t/") == ["t/x.parquet"]
    assert store.storage_options()["key"] == "PROFILEKEY"
    assert "profile-secret" not in repr(store) and "profile-secret" not in repr(store.credentials())


def test_explicit_endpoint_wins_over_the_environment(s3_root, monkeypatch):
    real = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    store = open_store(StorageConfig(root=s3_root, endpoint_url=real))
    store.write_bytes("k", b"v")
    assert store.exists("k") and store.endpoint_url == real


@pytest.mark.usefixtures("prefect_server")
def test_prefect_secret_block_supplies_keys_without_env(s3_root, small_config, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.build import open_config_store

    _no_env_keys(monkeypatch)
    Secret(value=json.dumps({"aws_access_key_id": "BLOCKKEY", "aws_secret_access_key": "block-secret"})).save("s3-test", overwrite=True)
    cfg = small_config(storage={"root": s3_root, "credentials_block": "secret/s3-test"})
    store = open_config_store(cfg)
    assert store.credentials() == S3Credentials("BLOCKKEY", "block-secret")
    store.write_bytes("x", b"1")
    assert store.read_bytes("x") == b"1"
    assert "block-secret" not in json.dumps(cfg.model_dump(mode="json"))  # only the block's name is config


def test_config_refuses_credentials_in_the_endpoint_url(small_config):
    with pytest.raises(Exception, match="embeds credentials"):
        small_config(storage={"root": "s3://b/p", "endpoint_url": "http://key:secret@minio:9000"})


def test_bad_roots_are_refused():
    with pytest.raises(ConfigError, match="s3://bucket"):
        open_store("s3://")
    with pytest.raises(ConfigError, match="local path or s3://"):
        open_store("gs://bucket/x")


def _cli(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["datasets", *args])


def test_cli_export_to_s3_uses_the_cli_endpoint_and_errors_are_one_line(s3_root, moto_server, tmp_path, monkeypatch):
    from test_exports import _commit

    _commit(open_store(s3_root))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --endpoint-url says where the server is
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a wrong endpoint fails at once instead of after backoff
    bucket = s3_root.split("/")[2]
    base = ["--root", s3_root, "--endpoint-url", moto_server, "--catalog", str(tmp_path / "c.duckdb")]
    res = _cli(*base, "export", "demo@v1", "--format", "trl-prm", "--out", f"s3://{bucket}/exports/trl-prm")
    assert res.exit_code == 0, res.output
    out = open_store(StorageConfig(root=f"s3://{bucket}/exports/trl-prm", endpoint_url=moto_server))
    assert {"data/train-00000.parquet", "README.md", "export.json"} <= set(out.list(""))
    res = _cli("--root", s3_root, "--endpoint-url", "http://127.0.0.1:9", "list")  # nothing listens there
    assert res.exit_code == 2 and "error:" in res.output and "Could not connect" in res.output and "--endpoint-url" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = _cli(*base, "export", "demo@v1", "--format", "trl-prm", "--out", "s3://no-such-bucket-sf/x")
    assert res.exit_code == 2 and "S3 request failed" in res.output and "NoSuchBucket" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.usefixtures("prefect_server")
def test_cli_and_publish_flow_take_s3_keys_from_a_prefect_block(s3_root, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.publish import publish_dataset
    from test_exports import _commit

    _commit(open_store(s3_root))  # written with the env keys moto accepts for any value
    _no_env_keys(monkeypatch)
    Secret(value=json.dumps({"aws_access_key_id": "BLOCKKEY", "aws_secret_access_key": "block-secret"})).save("s3-cli", overwrite=True)
    res = _cli("--root", s3_root, "list")
    assert res.exit_code == 2 and "credentials" in res.output.lower(), res.output  # no keys anywhere: refused
    base = ["--root", s3_root, "--credentials-block", "secret/s3-cli", "--catalog", str(tmp_path / "c.duckdb")]
    res = _cli(*base, "list")
    assert res.exit_code == 0 and "v1" in res.output, res.output
    res = _cli(*base, "export", "demo@v1", "--format", "trl-prm", "--out", s3_root + "-out/trl-prm")
    assert res.exit_code == 0, res.output
    assert "block-secret" not in res.output
    summary = publish_dataset(ref="demo@v1", repo="org/demo",
                              storage=StorageConfig(root=s3_root, credentials_block="secret/s3-cli"),
                              exports={"trl-prm": {}}, folder=str(tmp_path / "hub"), dry_run=True)
    assert summary["configs"] == ["trl_prm"] and (tmp_path / "hub" / "trl_prm" / "train-00000.parquet").is_file()
    res = _cli(*base, "publish", "demo@v1", "--repo", "org/demo", "--dry-run", "--export", "trl-prm",
               "--folder", str(tmp_path / "hub2"))
    assert res.exit_code == 0 and (tmp_path / "hub2" / "trl_prm" / "train-00000.parquet").is_file(), res.output


def test_the_store_protocol_is_what_the_storage_layer_calls_and_both_stores_implement_it(s3_root, tmp_path):
    """Everything storage/ calls on a store is in `ObjectStore`, both stores implement all of it, and only the
    store module reads a root's scheme (everyone else asks `is_remote`)."""
    import re

    from conftest import REPO
    from storage.objectstore import ObjectStore

    members = {n for n in dir(ObjectStore) if not n.startswith("_")} | set(ObjectStore.__annotations__)
    for path in REPO.glob("storage/**/*.py"):
        called = set(re.findall(r"\bstore\.(\w+)", path.read_text(encoding="utf-8")))
        assert called <= members, f"{path.relative_to(REPO)} calls {called - members} outside the store protocol"
    local, remote = open_store(str(tmp_path / "data")), open_store(s3_root)
    assert isinstance(local, ObjectStore) and isinstance(remote, ObjectStore)
    assert (local.is_remote, remote.is_remote) == (False, True)
    assert open_store(remote.settings()).root == remote.root and remote.settings().endpoint_url == remote.endpoint_url
    for path in [*REPO.glob("flows/**/*.py"), *REPO.glob("storage/**/*.py"), *REPO.glob("tasks/**/*.py")]:
        if path == REPO / "storage" / "objectstore.py":
            continue
        source = path.read_text(encoding="utf-8")
        for needle in ('startswith("s3://")', "startswith('s3://')", '"://" in'):
            assert needle not in source, f"{path.relative_to(REPO)} tests a root's scheme: ask `is_remote`"


def test_recorded_config_keeps_env_names_and_drops_their_values():
    from storage.secrets import recorded_config

    data = {"formal": {"lean": {"env": {"LEAN_KEY": "abc"}, "kind": "repl"}}, "checks": [{"env": {"X": "1"}}]}
    out = recorded_config(data)
    assert out["formal"]["lean"] == {"env": {"LEAN_KEY": "(set; value not recorded)"}, "kind": "repl"}
    assert out["checks"][0]["env"] == {"X": "(set; value not recorded)"}
    assert data["formal"]["lean"]["env"] == {"LEAN_KEY": "abc"}  # the input is left as it was
