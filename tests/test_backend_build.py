"""`build_dataset` through the OpenAI backend and the stand-in server: same labels as in-process, faults
that change nothing, a dead server that fails the shard clearly and a rerun that resumes."""

from __future__ import annotations

import re

import pyarrow.dataset as pads
import pytest
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from storage.errors import PolicyError
from storage.objectstore import open_store
from storage.release import read_manifest
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
from tasks.testing.standin_server import StandinServer, StandinServerConfig

pytestmark = pytest.mark.usefixtures("prefect_server")

MODEL = "simulated-arith"


def _openai(url: str, **changes) -> dict:
    return {"kind": "openai", "base_url": url, "model": MODEL, "api_key_env": None, "timeout_s": 1.0,
            "backoff_initial_s": 0.01, "backoff_max_s": 0.05, **changes}


def _cfg(small_config, **changes):
    base = dict(source={"kind": "synthetic", "num_problems": 16, "seed": 2}, search={"num_solutions": 2, "k": 4},
                rollout_cache=False)  # no cache: every run must really go through the server
    base.update(changes)
    return small_config(**base)


def _rows(root, dataset: str, version: int, table: str, drop=()) -> list[dict]:
    rows = pads.dataset(str(root / dataset / f"v{version}" / table), format="parquet").to_table().to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows),
                  key=lambda r: tuple(str(r[k]) for k in sorted(r)))


def test_build_over_http_labels_like_in_process_and_faults_change_nothing(small_config, tmp_path):
    root = tmp_path / "data"
    local = build_dataset(_cfg(small_config))
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        clean = build_dataset(_cfg(small_config, policy=_openai(srv.base_url)))
        srv.set_faults(fault_rate=0.1, slow_s=3.0, retry_after_s=0.01)
        faulty = build_dataset(_cfg(small_config, policy=_openai(srv.base_url)))
        injected = sum(srv.stats.faults.values())
    assert (local["version"], clean["version"], faulty["version"]) == (1, 2, 3)
    # Same labels as the in-process policy with the same seed; the nodes differ only in `policy` (the
    # backend's identity, deliberately part of the data so HTTP and in-process rollouts never mix).
    assert _rows(root, "demo", 2, "steps") == _rows(root, "demo", 1, "steps")
    assert _rows(root, "demo", 2, "pairs") == _rows(root, "demo", 1, "pairs")
    assert _rows(root, "demo", 2, "nodes", drop=("policy",)) == _rows(root, "demo", 1, "nodes", drop=("policy",))
    # The id names the model plus a hash of its sampling settings (never the URL, which changes per run).
    want_id = OpenAIPolicy(OpenAIPolicyConfig(**_openai("http://other:1/v1"))).policy_id
    assert want_id.startswith(f"openai:completions/{MODEL}@")
    assert {r["policy"] for r in _rows(root, "demo", 2, "nodes")} == {want_id}
    # 10% faults: same content hash, every fault retried once, no rollout lost or duplicated.
    assert faulty["content_hash"] == clean["content_hash"] and injected > 0
    assert faulty["usage"]["retries"] == injected and clean["usage"]["retries"] == 0
    assert faulty["rollouts"] == clean["rollouts"] and faulty["usage"]["requests"] == clean["usage"]["requests"]
    manifest = read_manifest(open_store(str(root)), "demo", 3)
    usage = manifest["stats"]["usage"]
    assert usage["requests"] == clean["usage"]["requests"] and usage["prompt_tokens"] > 0
    assert usage["cached_tokens"] > 0, "children's prompts extend their parents': the server's prefix cache hits"
    assert manifest["config"]["prompt"]["template"]  # the template text travels with the release


def test_dead_server_fails_the_shard_clearly_and_the_rerun_resumes(small_config, tmp_path):
    cfg_kw = dict(source={"kind": "synthetic", "num_problems": 24, "seed": 4}, concurrency={"shards": 1})
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        reference = build_dataset(_cfg(small_config, policy=_openai(srv.base_url), **cfg_kw))
    per_shard = reference["usage"]["requests"] / 3
    crash = StandinServer(StandinServerConfig(model=MODEL, die_after=int(per_shard * 1.5)))
    crash.start()
    try:
        with pytest.raises(PolicyError, match=r"unreachable for \d+ s, longer than `policy.max_outage_s` \(1 s\)") as info:
            build_dataset(_cfg(small_config, policy=_openai(crash.base_url, breaker_threshold=4, breaker_cooldown_s=0.2,
                                                            max_outage_s=1.0), **cfg_kw))
        assert crash.base_url in str(info.value) and "resume" in str(info.value)
        # The failed shard's usage is in the message: nothing else records it.
        assert re.search(r"\d+ requests answered, \d+ retries, \d+ failed", str(info.value))
    finally:
        crash.stop()
    # A new server on another port: base_url is not part of the build key, so finished shards are reused.
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        rerun = build_dataset(_cfg(small_config, policy=_openai(srv.base_url), **cfg_kw))
    assert rerun["shards_resumed"] >= 1 and rerun["content_hash"] == reference["content_hash"]


def test_cli_build_against_the_standin(tmp_path):
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        result = CliRunner().invoke(app, [
            "build", "--set", f"storage.root={tmp_path / 'data'}", "--set", "source.num_problems=8",
            "--set", "search.k=4", "--set", "policy.kind=openai", "--set", f"policy.base_url={srv.base_url}",
            "--set", f"policy.model={MODEL}", "--set", "prompt.family=chat", "--set", "policy.endpoint=chat"])
    assert result.exit_code == 0, result.output
    assert "policy requests" in result.output and "Committed demo@v1" in result.output
    assert srv.stats.answered > 0
