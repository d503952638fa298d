"""The `mustard_dataset` Prefect flow on the embedded default (simulated author, stand-in Lean REPL): a real
Prefect run commits a release whose `mustard` table the `datasets` loader reads, with the four texts, the
verdict history and the revisions; the manifest counts every seed and lists each failure with its reason;
the same config gives the same content hash; a run that finds shards staged by an earlier one resumes and
gives the same hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.mustard_config import MustardConfig, load_mustard_config
from storage.errors import ConfigError

DEFAULT_HASH = "8935c4927c36f040"  # `stepforge mustard` in an empty folder (README)


def config(tmp_path: Path, root: str = "data", **changes) -> MustardConfig:
    data = {"levels": ["middle school", "high school"], "samples_per_concept": 3, "shard_size": 12,
            "storage": {"root": str(tmp_path / root)}}
    data.update(changes)
    return MustardConfig.model_validate(data)


def test_flow_commits_a_release_the_datasets_loader_reads(prefect_server, tmp_path: Path) -> None:
    import datasets

    from flows.mustard import mustard_dataset
    from storage.catalog import Catalog
    from storage.objectstore import open_store
    from storage.release import read_manifest, verify_release

    cfg = config(tmp_path)
    summary = mustard_dataset(cfg)
    assert summary["version"] == 1 and summary["seeds"] == (7 + 4) * 3  # middle school: 7 concepts, high school: 4
    store = open_store(cfg.storage)
    manifest = read_manifest(store, "mustard", 1)
    st = manifest["stats"]
    assert st["seeds"] == summary["seeds"] and st["passed"] == manifest["row_counts"]["mustard"] > 0
    assert st["seeds"] == st["passed"] + sum(st["failed"].values()) == st["passed"] + st["failures_total"]
    assert all(f["status"] in ("invalid", "timeout", "error", "malformed") and f["detail"] for f in st["failures"])
    assert manifest["algorithm"] == "mustard" and manifest["policy"].startswith("simulated-author/")
    assert verify_release(store, "mustard", 1) == []
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data/mustard/v1/mustard/*.parquet"), split="train")
    assert len(ds) == st["passed"]
    for row in ds:
        assert row["level"] in ("middle school", "high school")
        assert row["problem"] and row["informal_proof"] and row["concept"]
        assert row["formal_proof"].startswith("import Mathlib") and row["formal_statement"].startswith("theorem ")
        assert row["attempts"][-1] == row["formal_proof"] and len(row["attempts"]) == row["revisions"] + 1
        assert [v["status"] for v in row["verdicts"]] == ["invalid"] * row["revisions"] + ["valid"]
        assert len(row["feedback"]) == row["revisions"] and all("- line " in f for f in row["feedback"])
    by_rev = {}
    for row in ds:
        by_rev[str(row["revisions"])] = by_rev.get(str(row["revisions"]), 0) + 1
    assert by_rev == st["passed_after_revisions"] and "1" in by_rev
    problems = datasets.load_dataset("parquet", data_files=str(tmp_path / "data/mustard/v1/problems/*.parquet"),
                                     split="train")
    assert set(problems["problem_id"]) == set(ds["problem_id"]) and set(problems["domain"]) == {"lean"}
    assert len(problems) == len(set(problems["problem_id"])), "a concept's repeated problem is one row"
    cols, got = Catalog.for_store(store).sql("SELECT count(*), sum(revisions) FROM mustard_mustard")
    assert got[0][0] == st["passed"] and got[0][1] == sum(ds["revisions"])


def test_same_config_same_hash_and_a_rerun_resumes_from_staged_shards(prefect_server, tmp_path: Path) -> None:
    from flows.mustard import mustard_dataset, mustard_shard_task, plan

    cfg = config(tmp_path, max_revisions=1)
    first, second = mustard_dataset(cfg), mustard_dataset(cfg)
    assert (first["version"], second["version"]) == (1, 2) and first["content_hash"] == second["content_hash"]
    # A run that died after its first shard: the shard is staged (journal), the rest is not.
    other = config(tmp_path, "resumed", max_revisions=1)
    shards = plan(other)
    assert len(shards) >= 2
    mustard_shard_task.fn(other, other.build_key(), shards[0].key, 0)
    resumed = mustard_dataset(other)
    assert resumed["shards_resumed"] == 1 and resumed["content_hash"] == first["content_hash"]
    # R changes the data: R = 0 passes fewer seeds, and only those without a revision.
    none = mustard_dataset(config(tmp_path, "r0", max_revisions=0))
    assert none["passed"] < first["passed"] and set(none["passed_after_revisions"]) == {"0"}
    assert none["passed_after_revisions"]["0"] == first["passed_after_revisions"]["0"]
    # The embedded default (`stepforge mustard` in an empty folder), pinned like the default build's hash:
    # a change that means to change the generated data updates it here and in the README.
    default = mustard_dataset(MustardConfig(storage={"root": str(tmp_path / "default")}))
    assert (default["seeds"], default["passed"]) == (72, 69) and default["content_hash"][:16] == DEFAULT_HASH


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    from flows.cli import app
    from flows.mustard_config import verify_mustard

    with pytest.raises(ConfigError, match="`max_revisions`"):
        load_mustard_config(None, ["max_revisions=-1"])
    cfg = load_mustard_config(None, ["author.mistake_rate=0.5"])
    assert cfg.author.kind == "simulated-author" and cfg.author.mistake_rate == 0.5
    assert cfg.lean.kind == "repl" and cfg.lean.command[-1] == "verifiers.lean.testing.repl_server"
    # A `lean` section of its own is a real REPL (`lake env repl`), never silently the stand-in.
    assert load_mustard_config(None, ["lean.timeout_s=5"]).lean.command == ["lake", "env", "repl"]
    with pytest.raises(ConfigError, match="`levels`"):
        verify_mustard(load_mustard_config(None, ["levels=[kindergarten]"]))
    result = CliRunner().invoke(app, ["mustard", "--set", "concepts_path=/nonexistent.yaml"])
    assert result.exit_code == 2 and "concepts_path" in result.output


def test_crashes_and_hangs_in_a_run_are_counted_and_listed_in_the_manifest(prefect_server, tmp_path: Path) -> None:
    from flows.mustard import mustard_dataset
    from flows.mustard_config import standin_repl_command
    from storage.objectstore import open_store
    from storage.release import read_manifest

    # The stand-in draws each command's fault from its seed and the command's text alone, so the same proofs
    # hang or crash in every run, whichever pooled process gets them: the counts below are deterministic.
    faulty = {"kind": "repl", "command": [*standin_repl_command(), "--crash-rate", "0.2", "--hang-rate", "0.2",
                                          "--seed", "7"], "timeout_s": 5, "crash_retries": 0, "max_repls": 4}
    cfg = config(tmp_path, lean=faulty)
    summary = mustard_dataset(cfg)
    st = read_manifest(open_store(cfg.storage), cfg.dataset, 1)["stats"]
    assert st["failed"].get("error", 0) >= 1 and st["failed"].get("timeout", 0) >= 1, st["failed"]
    listed = [f for f in st["failures"] if f["status"] in ("error", "timeout")]
    assert len(listed) == st["failed"]["error"] + st["failed"]["timeout"]
    assert all(("died" in f["detail"]) == (f["status"] == "error") for f in listed)
    assert st["lean_verdicts"].get("error", 0) == st["failed"]["error"]  # an unjudged proof is never revised
    assert summary["passed"] == st["passed"] > 0 and st["seeds"] == st["passed"] + sum(st["failed"].values())
    again = mustard_dataset(config(tmp_path, "again", lean=faulty, concurrency={"shards": 1}))
    assert again["failed"] == summary["failed"] and again["content_hash"] == summary["content_hash"]


def test_lean_slots_hold_a_prefect_global_concurrency_limit(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.mustard import mustard_dataset
    from verifiers.lean.testing.kimina_server import KiminaStandin, KiminaStandinConfig

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="stepforge-test-mustard-lean", limit=1))
    with KiminaStandin(KiminaStandinConfig(max_repls=8, cost_ms=40)) as srv:
        summary = mustard_dataset(config(tmp_path, levels=["high school"], shard_size=4,
                                         concurrency={"shards": 3, "lean_slots": "stepforge-test-mustard-lean"},
                                         lean={"kind": "kimina", "base_url": srv.url}))
        assert srv.requests >= 3 and srv.peak_in_flight == 1, "one slot: one Lean batch at a time"
    assert summary["passed"] > 0
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("stepforge-test-mustard-lean").active_slots == 0
    with pytest.raises(ConfigError, match="`concurrency.lean_slots`.*prefect gcl create"):
        mustard_dataset(config(tmp_path, "other", levels=["high school"], concurrency={"lean_slots": "no-such"}))


def test_http_author_and_kimina_commit_the_same_records_as_in_process_and_the_repl(prefect_server, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from flows.mustard import mustard_dataset
    from flows.mustard_config import standin_repl_command
    from tasks.testing.standin_server import StandinServer, StandinServerConfig
    from verifiers.lean.testing.kimina_server import KiminaStandin

    local = mustard_dataset(config(tmp_path, "local", levels=["high school"], lean={"command": standin_repl_command(),
                                                                              "env": {"SOME_SETTING": "s3cr3t"}}))
    with StandinServer(StandinServerConfig(author_model="sim-author")) as server, KiminaStandin() as kimina:
        remote = mustard_dataset(config(tmp_path, "remote", levels=["high school"],
                                        author={"kind": "openai", "base_url": [server.base_url], "model": "sim-author"},
                                        lean={"kind": "kimina", "base_url": kimina.url}))
    assert local["content_hash"] != remote["content_hash"]  # the author and verifier ids differ, nothing else

    def records(root: str) -> list[dict]:
        rows = pq.read_table(tmp_path / root / "mustard/v1/mustard").to_pylist()
        for r in rows:
            r.pop("author")
            r["verdicts"] = [(v["status"], v["detail"]) for v in r["verdicts"]]
        return rows

    assert records("local") == records("remote") and len(records("local")) == local["passed"] > 0
    manifest = json.loads((tmp_path / "local/mustard/v1/manifest.json").read_text())
    assert "s3cr3t" not in json.dumps(manifest) and "SOME_SETTING" in manifest["config"]["lean"]["env"]
    assert "Concept: {{ concept }}" in manifest["templates"]["author"]


def test_cli_runs_the_flow_with_a_progress_bar_and_a_summary(prefect_server, tmp_path: Path) -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["mustard", "--set", "levels=[higher education]", "--set", "samples_per_concept=2",
                                      "--set", f"storage.root={tmp_path / 'cli'}", "--set", "dataset=lean-gen"])
    assert result.exit_code == 0, result.output
    assert "generating lean-gen (seeds)" in result.output and "4/4" in result.output
    assert "passed after revisions" in result.output and "Committed lean-gen@v1" in result.output
    assert "FROM lean_gen_mustard" in result.output
    assert (tmp_path / "cli/lean-gen/v1/manifest.json").is_file()
