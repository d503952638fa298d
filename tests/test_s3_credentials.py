"""Where S3 credentials come from: the environment, an AWS profile, or a Prefect block resolved inside the
process (never a config field); the endpoint from AWS_ENDPOINT_URL or the config. All against moto over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.errors import ConfigError
from storage.objectstore import S3Credentials, open_store


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
    store = open_store(s3_root, profile="minio")
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
    store = open_store(s3_root, endpoint_url=real)
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
    with pytest.raises(Exception, match="must not embed credentials"):
        small_config(storage={"root": "s3://b/p", "endpoint_url": "http://key:secret@minio:9000"})


def test_bad_roots_are_refused():
    with pytest.raises(ConfigError, match="s3://bucket"):
        open_store("s3://")
    with pytest.raises(ConfigError, match="local path or s3://"):
        open_store("gs://bucket/x")
