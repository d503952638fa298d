"""`build_dataset` against moto's S3 server over HTTP, then the catalog over DuckDB httpfs, the CLI, an
export read back with `datasets`, and a publish to a fake Hub; and the secrets test: fake AWS keys and a
fake HF token never appear in any written file, object, Prefect log, parameter or artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_fixtures import fake_hub  # noqa: F401  (fixture)
from s3_fixtures import FAKE_KEY_ID, FAKE_SECRET, FAKE_SESSION, moto_server, s3_env, s3_root  # noqa: F401
from storage.catalog import Catalog
from storage.objectstore import open_store
from storage.release import list_versions, read_manifest, verify_release

pytestmark = pytest.mark.usefixtures("prefect_server")

HF_TOKEN = "hf_fakeSECRETtokenDONOTLEAK0987654321"


def _cfg(small_config, s3_root, tmp_path):
    return small_config(source={"kind": "synthetic", "num_problems": 8, "seed": 0},
                        storage={"root": s3_root, "catalog": str(tmp_path / "catalog.duckdb")})


def test_build_on_s3_then_query_it_with_duckdb_httpfs(small_config, s3_root, tmp_path):
    from flows.build import build_dataset
    from flows.cli import app

    summary = build_dataset(_cfg(small_config, s3_root, tmp_path))
    store = open_store(s3_root)
    assert summary["version"] == 1 and summary["location"] == f"{s3_root}/demo/v1"
    assert list_versions(store, "demo") == [1] and verify_release(store, "demo", 1) == []
    assert store.list("demo/_staging/") == []  # staging collected after the commit
    m = read_manifest(store, "demo", 1)
    catalog = Catalog(tmp_path / "catalog.duckdb")  # opened by path: same root, credentials from the env
    _, rows = catalog.sql("SELECT count(*), count(DISTINCT problem_id) FROM demo_v1_steps")
    assert rows[0] == (m["row_counts"]["steps"], 8)
    _, rows = catalog.sql("SELECT version, seed, code_version, policy, json_extract(row_counts, '$.steps')::INT FROM builds")
    assert rows == [(1, 0, m["code_version"], m["policy"], m["row_counts"]["steps"])]

    runner = CliRunner()
    res = runner.invoke(app, ["datasets", "--root", s3_root, "--catalog", str(tmp_path / "cli.duckdb"), "sql", "--json",
                              "SELECT version, count(*) AS n FROM demo_all_steps GROUP BY version"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"version": 1, "n": m["row_counts"]["steps"]}]
    res = runner.invoke(app, ["datasets", "--root", s3_root, "verify", "demo@v1"])
    assert res.exit_code == 0 and "demo@v1: OK" in res.stdout
    res = runner.invoke(app, ["datasets", "--root", s3_root, "show", "demo"])  # reads steps via pyarrow S3
    assert res.exit_code == 0 and "label balance (steps with mc_c > 0)" in res.stdout, res.output
    res = runner.invoke(app, ["datasets", "--root", s3_root, "list"])
    assert res.exit_code == 0 and "v1" in res.stdout
    # A second build of the same config commits v2 with equal content (deterministic simulated policy).
    summary2 = build_dataset(_cfg(small_config, s3_root, tmp_path))
    assert summary2["version"] == 2 and summary2["content_hash"] == summary["content_hash"]
    res = runner.invoke(app, ["datasets", "--root", s3_root, "diff", "--json", "demo@v1", "demo@v2"])
    assert res.exit_code == 0, res.output
    diff = {r["metric"]: r for r in json.loads(res.stdout)}
    assert diff["steps added"]["b"] == 0 and diff["content hash"]["delta"] == "same"


def _written_files(*roots: Path, since: float) -> list[Path]:
    out = []
    for root in roots:
        if root.exists():
            out += [p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since]
    return out


def _decoded(name: str, data: bytes) -> str | None:
    """The values inside a file whose bytes hide them (zstd Parquet pages, DuckDB blocks), as text."""
    import io

    import pyarrow.parquet as pq

    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
        return json.dumps({"rows": table.to_pylist(), "metadata": meta}, default=str, ensure_ascii=False)
    if name.endswith(".duckdb"):
        import duckdb

        con = duckdb.connect(name, read_only=True)
        try:
            parts = []
            tables = con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
            for (table,) in tables:
                parts.append(json.dumps(con.execute(f'SELECT * FROM "{table}"').fetchall(), default=str))
            parts.append(json.dumps(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()))
            # Only TEMPORARY secrets are ever made; a persistent one would be stored in the catalog's home.
            persistent = con.execute("SELECT name FROM duckdb_secrets() WHERE persistent").fetchall()
            assert persistent == [], f"persistent DuckDB secret in {name}"
            assert {t for (t,) in tables} >= {"datasets", "versions", "builds"}, tables
            return "\n".join(parts)
        finally:
            con.close()
    return None


def _isolated_from_env_keys(monkeypatch) -> None:
    """No keys in the environment or default files: the profile or the block is the only source."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("source", ["env", "profile", "block"])
def test_secrets_never_appear_in_any_written_file_log_or_artifact(source, small_config, s3_root, tmp_path, tmp_path_factory,
                                                                  fake_hub, monkeypatch):
    import uuid

    from prefect.client.orchestration import get_client

    from flows.build import build_dataset
    from flows.cli import app
    from storage.objectstore import S3Credentials

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    storage = {"root": s3_root, "catalog": str(tmp_path / "catalog.duckdb")}
    cli_creds: list[str] = []
    if source == "env":
        creds = S3Credentials(FAKE_KEY_ID, FAKE_SECRET, FAKE_SESSION)
    else:
        tag = source.upper()
        creds = S3Credentials(f"AKIA{tag}FAKE0001", f"{source}-secret-DO-NOT-LEAK-9d1e", f"{source}-session-DO-NOT-LEAK-5c2f")
        _isolated_from_env_keys(monkeypatch)
        if source == "profile":
            aws = tmp_path_factory.mktemp("aws-home") / "credentials"  # outside the scanned folders: it holds the keys
            aws.write_text(f"[sf-secret]\naws_access_key_id = {creds.access_key_id}\n"
                           f"aws_secret_access_key = {creds.secret_access_key}\naws_session_token = {creds.session_token}\n")
            monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws))
            storage["profile"] = "sf-secret"
            cli_creds = ["--profile", "sf-secret"]
        else:
            from prefect.blocks.system import Secret

            name = f"sf-secret-{uuid.uuid4().hex[:8]}"
            Secret(value=json.dumps({"aws_access_key_id": creds.access_key_id, "aws_secret_access_key": creds.secret_access_key,
                                     "aws_session_token": creds.session_token})).save(name, overwrite=True)
            storage["credentials_block"] = f"secret/{name}"
            cli_creds = ["--credentials-block", f"secret/{name}"]
    secrets = [creds.access_key_id, creds.secret_access_key, creds.session_token, HF_TOKEN]
    started = time.time() - 1
    cfg = small_config(source={"kind": "synthetic", "num_problems": 8, "seed": 0}, storage=storage)
    state = build_dataset(cfg, return_state=True)
    assert state.is_completed()
    runner = CliRunner()
    base = ["datasets", "--root", s3_root, "--catalog", str(tmp_path / "catalog.duckdb"), *cli_creds]
    res = runner.invoke(app, base + ["export", "demo@v1", "--format", "trl-prm", "--out", s3_root + "-out/trl-prm"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, base + ["export", "demo@v1", "--format", "math-shepherd", "--out", str(tmp_path / "ms")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, base + ["sql", "SELECT count(*) FROM demo_v1_steps"])  # DuckDB httpfs with the same keys
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, base + ["publish", "demo@v1", "--repo", "org/demo", "--private", "--folder", str(tmp_path / "hub")])
    assert res.exit_code == 0, res.output
    assert fake_hub.repos["org/demo"]["tags"], fake_hub.paths()
    repo_calls = [r for r in fake_hub.requests if r.path.startswith(("/api/repos/", "/api/datasets/"))]
    assert repo_calls and all(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in repo_calls)
    assert HF_TOKEN not in res.output and creds.secret_access_key not in res.output

    blobs: dict[str, bytes] = {}
    store = open_store(s3_root, credentials=creds)
    out_store = open_store(s3_root + "-out", credentials=creds)
    for st in (store, out_store):
        for key in st.list(""):
            blobs[st.uri(key)] = st.read_bytes(key)
    assert any(k.endswith("manifest.json") for k in blobs) and any("-out/trl-prm/README.md" in k for k in blobs)
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH

    local = _written_files(tmp_path, Path(PREFECT_HOME.value()), Path(PREFECT_LOCAL_STORAGE_PATH.value()),
                           Path.home() / ".cache" / "stepforge", since=started)
    for path in local:
        blobs[str(path)] = path.read_bytes()
    assert any(p.endswith("catalog.duckdb") for p in blobs) and any(p.endswith("hub/README.md") for p in blobs)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        blobs["prefect:flow-run-parameters"] = json.dumps(run.parameters, default=str).encode()
        logs = client.read_logs()
        blobs["prefect:logs"] = "\n".join(log.message for log in logs).encode()
        blobs["prefect:artifacts"] = "\n".join(json.dumps(a.model_dump(mode="json"), default=str) for a in client.read_artifacts()).encode()
        blobs["prefect:task-runs"] = "\n".join(json.dumps(t.model_dump(mode="json"), default=str) for t in client.read_task_runs()).encode()
        blobs["prefect:flow-runs"] = "\n".join(json.dumps(r.model_dump(mode="json"), default=str) for r in client.read_flow_runs()).encode()
    assert len(blobs) > 20
    decoded = 0
    for name, data in blobs.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:6]}… leaked into {name}"
        # Compressed pages hide bytes from a grep, so read what the file holds and check the values too.
        text = _decoded(name, data) if name.startswith("/") or name.endswith(".parquet") else None
        if text is not None:
            decoded += 1
            for secret in secrets:
                assert secret not in text, f"{secret[:6]}… leaked into the values of {name}"
    assert decoded >= 10  # the release, export and Hub Parquet files and the catalog were all read back
