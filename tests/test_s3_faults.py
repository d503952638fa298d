"""S3 misbehaving behind a fault-injecting HTTP proxy on loopback, in front of moto: a storm of 503s and
slow responses changes nothing (same content hash); a wrong secret (403) and an endpoint that goes away
mid-build end `stepforge build` with one line and no traceback."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from s3_fixtures import FAKE_SECRET, moto_server, s3_env, s3_proxy, s3_root  # noqa: F401  (fixtures)
from storage.objectstore import open_store
from storage.release import verify_release

pytestmark = pytest.mark.usefixtures("prefect_server")


def _cfg(small_config, root: str, tmp_path, endpoint: str | None = None):
    return small_config(source={"kind": "synthetic", "num_problems": 8, "seed": 1}, search={"num_solutions": 2, "k": 4},
                        shard_size=4, storage={"root": root, "catalog": str(tmp_path / "catalog.duckdb"),
                                               "endpoint_url": endpoint})


def test_503s_and_slow_responses_for_a_few_seconds_change_nothing(small_config, s3_root, s3_proxy, tmp_path):
    clean = build_dataset(_cfg(small_config, s3_root, tmp_path))
    s3_proxy.storm(for_s=4.0, slow_s=0.3)
    stormy = build_dataset(_cfg(small_config, s3_root, tmp_path, endpoint=s3_proxy.url))
    assert s3_proxy.stats["503"] > 0 and s3_proxy.stats["slow"] > 0, s3_proxy.stats
    assert stormy["version"] == 2 and stormy["content_hash"] == clean["content_hash"]
    assert verify_release(open_store(s3_root), "demo", 2) == []


def _cli(root: str, endpoint: str, tmp_path, *extra: str):
    return CliRunner().invoke(app, ["build", "--set", f"storage.root={root}", "--set", f"storage.endpoint_url={endpoint}",
                                    "--set", f"storage.catalog={tmp_path / 'cli.duckdb'}", "--set", "source.num_problems=8",
                                    "--set", "search.k=4", "--set", "shard_size=4", *extra])


def _last(result) -> str:
    return [ln for ln in result.output.splitlines() if ln.strip()][-1]


def test_a_wrong_secret_ends_in_one_line(s3_root, s3_proxy, tmp_path):
    s3_proxy.deny()  # every request: 403 SignatureDoesNotMatch, as S3 answers a wrong secret key
    result = _cli(s3_root, s3_proxy.url, tmp_path)
    assert result.exit_code == 1, result.output
    assert re.fullmatch(r"error: S3 refused the credentials \((403|SignatureDoesNotMatch) on \w+\); check "
                        r"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `storage\.profile` or `storage\.credentials_block`\.",
                        _last(result)), _last(result)
    assert "Traceback" not in result.output and FAKE_SECRET not in result.output


def test_an_endpoint_that_goes_away_mid_build_ends_in_one_line(s3_root, s3_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail in seconds, not after six backed-off attempts
    s3_proxy.go_away_after(12)  # a few shard inputs are written, then the endpoint is gone
    result = _cli(s3_root, s3_proxy.url, tmp_path)
    assert s3_proxy.gone and result.exit_code == 1, result.output
    assert re.fullmatch(r"error: (S3 endpoint unreachable|storage request failed): .+(check `storage\.endpoint_url`"
                        r".+)?rerun the build to resume from the finished shards\.", _last(result)), _last(result)
    assert "Traceback" not in result.output
