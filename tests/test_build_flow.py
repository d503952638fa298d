"""`build_dataset` end to end under a real Prefect server: commit, manifest, catalog, labels, determinism,
crash-resume, quarantine and config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from storage.catalog import Catalog
from storage.errors import ConfigError
from storage.objectstore import open_store
from storage.release import list_versions, read_manifest, verify_release
from storage.render import StepFormat, segment
from tasks.sources.synthetic import first_error, parse_question

from conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_server")


def _table(root: Path, dataset: str, version: int, table: str) -> list[dict]:
    return pads.dataset(str(root / dataset / f"v{version}" / table), format="parquet").to_table().to_pylist()


def test_build_commits_a_verified_version_visible_in_the_catalog(small_config, tmp_path):
    cfg = small_config()
    summary = build_dataset(cfg)
    root = tmp_path / "data"
    assert summary["version"] == 1 and summary["problems"] == 24 and summary["steps"] > 0
    store = open_store(str(root))
    assert list_versions(store, "demo") == [1]
    manifest = read_manifest(store, "demo", 1)
    assert verify_release(store, "demo", 1) == []
    assert manifest["seed"] == cfg.seed and manifest["config"]["search"]["k"] == 8
    assert manifest["row_counts"]["problems"] == 24 and manifest["row_counts"]["steps"] == summary["steps"]
    assert {"sha256", "rows", "bytes"} <= set(manifest["files"]["steps/part-00000.parquet"])
    assert manifest["code_version"] and manifest["timings"]["shards_s"] >= 0
    assert (root / "demo" / "v1" / "README.md").read_text().startswith("# demo v1")

    catalog = Catalog.for_store(store)
    cols, rows = catalog.sql("SELECT count(*), count(DISTINCT problem_id) FROM demo_v1_steps")
    assert rows[0] == (summary["steps"], 24)
    _, rows = catalog.sql("SELECT count(*) FROM demo_steps")  # latest-version view
    assert rows[0][0] == summary["steps"]
    _, rows = catalog.sql("SELECT dataset, version, content_hash FROM versions")
    assert rows == [("demo", 1, manifest["content_hash"])]
    _, rows = catalog.sql("SELECT count(*) FROM demo_v1_nodes WHERE rollouts > 0 AND rollouts_correct > rollouts")
    assert rows[0][0] == 0

    # Every step row's offsets are where the segmenter finds that step in the solution rendered with the
    # release's own step format, so any other separator can be re-rendered from them.
    fmt = StepFormat(**manifest["config"]["prompt"]["step_format"])
    by_solution: dict[str, list[dict]] = defaultdict(list)
    for r in _table(root, "demo", 1, "steps"):
        by_solution[r["solution_id"]].append(r)
    for rows in by_solution.values():
        rows.sort(key=lambda r: r["step_index"])
        text = fmt.render([r["step_text"] for r in rows])
        assert [(s.start, s.end) for s in segment(text, fmt)] == [(r["char_start"], r["char_end"]) for r in rows]
        assert all(text[r["char_start"]:r["char_end"]] == r["step_text"] for r in rows)


def test_same_seed_same_content_hash_other_seed_differs(small_config, tmp_path):
    first = build_dataset(small_config())
    second = build_dataset(small_config())
    assert (first["version"], second["version"]) == (1, 2)
    assert first["content_hash"] == second["content_hash"]
    assert second["cache_hits"] > 0 and second["rollouts"] == 0, "the rerun's rollouts come from the cache"
    other = build_dataset(small_config(seed=1, rollout_cache=False))
    assert other["version"] == 3 and other["content_hash"] != first["content_hash"]


def test_step_labels_match_the_oracle(small_config, tmp_path):
    cfg = small_config(source={"num_problems": 40, "seed": 5}, search={"num_solutions": 4, "k": 16},
                       policy={"kind": "simulated", "step_error_rate": 0.25})
    build_dataset(cfg)
    root = tmp_path / "data"
    specs = {p["problem_id"]: parse_question(p["question"])[0] for p in _table(root, "demo", 1, "problems")}
    by_solution = defaultdict(list)
    for row in _table(root, "demo", 1, "steps"):
        by_solution[row["solution_id"]].append(row)
    before, agree, after, erroneous = 0, 0, 0, 0
    for rows in by_solution.values():
        rows.sort(key=lambda r: r["step_index"])
        assert [r["step_index"] for r in rows] == list(range(len(rows)))
        fe = first_error(specs[rows[0]["problem_id"]], [r["step_text"] for r in rows])
        erroneous += fe is not None
        for r in rows:
            # The last step of a finished solution is judged by its own final answer (k = 1).
            assert r["mc_k"] == (1 if r["step_index"] == len(rows) - 1 else 16) and 0 <= r["mc_c"] <= r["mc_k"]
            if fe is not None and r["step_index"] >= fe:
                after += 1
                assert r["mc_c"] == 0, "no rollout recovers from a wrong step"
            else:
                before += 1
                agree += r["mc_c"] > 0
        if fe is not None:
            assert rows[0]["first_error_index"] is not None and rows[0]["first_error_index"] <= fe
    assert erroneous > 10 and after > 20, "the data holds mistakes to check"
    assert agree / before >= 0.95, f"label agreement before the first error: {agree}/{before}"

    # nodes.final_answer is the answer read from the finished solution (not the verifier's message), and it
    # is right exactly where the node's own verdict says so.
    gold = {p["problem_id"]: Fraction(p["answer"]) for p in _table(root, "demo", 1, "problems")}
    finished = [n for n in _table(root, "demo", 1, "nodes") if n["is_terminal"]]
    assert len(finished) > 40
    for n in finished:
        stated = re.search(r"The answer is (\S+)\.$", n["step_text"])
        assert stated and n["final_answer"] == stated[1], n["step_text"]
        assert (Fraction(n["final_answer"]) == gold[n["problem_id"]]) == (n["rollouts_correct"] == 1)


def test_malformed_records_are_quarantined_and_the_build_goes_on(small_config, tmp_path):
    src = tmp_path / "mixed.jsonl"
    good = [{"question": q, "answer": a} for q, a in
            [("Ava has 5 apples. Then Ava gets 3 more apples. How many apples does Ava have at the end?", "8"),
             ("Ben has 10 coins. Then Ben gives away 4 coins. How many coins does Ben have at the end?", "6")]]
    src.write_text("\n".join([json.dumps(good[0]), "{broken", json.dumps({"question": "Q?"}), json.dumps(good[1])]) + "\n")
    summary = build_dataset(small_config(source={"kind": "file", "path": str(src)}))
    assert summary["problems"] == 2 and summary["quarantined"] == 2
    manifest = read_manifest(open_store(str(tmp_path / "data")), "demo", 1)
    reasons = sorted(q["reason"] for q in manifest["source"]["quarantine"])
    assert reasons[0].startswith("mixed.jsonl:line 2") and "not valid JSON" in reasons[0]
    assert reasons[1].startswith("mixed.jsonl:line 3: field 'answer'")


def test_bad_config_is_rejected_before_any_work_naming_the_field(tmp_path):
    runner = CliRunner()
    root = tmp_path / "data"
    for args, field in [(["--set", "search.k=0"], "search.k"),
                        (["--set", "dataset=../escape"], "dataset"),
                        (["--set", "policy.step_error_rate=2"], "policy.step_error_rate"),
                        (["--set", "source.kind=nope"], "source"),
                        (["--set", "shard_size=many"], "shard_size")]:
        result = runner.invoke(app, ["build", "--set", f"storage.root={root}", *args])
        assert result.exit_code == 2, result.output
        assert f"`{field}`" in result.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("search:\n  algorithm: math-shepherd\n  k: -1\nsurprise: 1\n")
    result = runner.invoke(app, ["build", "--config", str(cfg), "--set", f"storage.root={root}"])
    assert result.exit_code == 2 and "`search.k`" in result.output and "`surprise`" in result.output
    assert not root.exists(), "nothing was written"


def test_cli_build_prints_summary_and_datasets_commands_work(tmp_path):
    runner = CliRunner()
    root = tmp_path / "data"
    args = ["build", "--set", f"storage.root={root}", "--set", "source.num_problems=12", "--set", "search.k=4",
            "--set", "dataset=cli-demo"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"Committed cli-demo@v1 at {root}/cli-demo/v1" in result.output and "label balance" in result.output
    assert "labels by step position" in result.output
    ds = ["datasets", "--root", str(root)]
    out = runner.invoke(app, [*ds, "list"])
    assert out.exit_code == 0 and "cli-demo" in out.output, out.output
    out = runner.invoke(app, [*ds, "show", "cli-demo@v1"])
    assert out.exit_code == 0 and "steps" in out.output, out.output
    out = runner.invoke(app, [*ds, "sql", "SELECT count(*) AS n FROM cli_demo_v1_problems"])
    assert out.exit_code == 0 and "12" in out.output, out.output


def test_crash_resume_skips_finished_shards_and_gives_the_same_content(small_config, tmp_path):
    from prefect.settings import PREFECT_API_URL

    changes = dict(source={"num_problems": 48, "seed": 2}, shard_size=8, concurrency={"shards": 1},
                   policy={"kind": "simulated", "latency_s": 0.15})
    crashed = small_config(**changes)
    config_path = tmp_path / "build.yaml"
    config_path.write_text(yaml.safe_dump(crashed.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", "--config", str(config_path)],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = tmp_path / "data" / "demo" / "_staging"
    deadline = time.monotonic() + 240
    done: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(staging.glob("*/*/_DONE.json"))
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done) < 6, f"the kill should land mid-build; {len(done)} shards were done"
    assert list_versions(open_store(str(tmp_path / "data")), "demo") == [], "a killed build leaves nothing visible"

    resumed = build_dataset(crashed)
    assert resumed["shards_resumed"] >= 2 and resumed["version"] == 1
    clean = build_dataset(small_config(**changes, storage={"root": str(tmp_path / "clean")}, rollout_cache=False))
    assert resumed["content_hash"] == clean["content_hash"]
    root = tmp_path / "data"
    nodes = _table(root, "demo", 1, "nodes")
    steps = _table(root, "demo", 1, "steps")
    problems = _table(root, "demo", 1, "problems")
    assert len({n["node_id"] for n in nodes}) == len(nodes)
    assert len({(s["solution_id"], s["step_index"]) for s in steps}) == len(steps)
    assert len({p["problem_id"] for p in problems}) == len(problems) == 48


def test_a_build_publishes_its_summary_label_balance_and_progress_artifacts(small_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = build_dataset(small_config(dataset="artifacts-demo"))
    keys = ["artifacts-demo-build-summary", "artifacts-demo-label-balance", "artifacts-demo-build-progress",
            "artifacts-demo-label-by-step"]
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))}
    assert set(found) == set(keys)
    assert found["artifacts-demo-build-summary"].type == "markdown"
    assert f"| content hash | {summary['content_hash'][:16]} |" in found["artifacts-demo-build-summary"].data
    balance = json.loads(found["artifacts-demo-label-balance"].data)
    assert sum(r["steps"] for r in balance) == summary["steps"]
    assert [r["steps"] for r in balance][0] == summary["steps_positive"]
    by_step = json.loads(found["artifacts-demo-label-by-step"].data)
    assert sum(r["steps"] for r in by_step) == summary["steps"] and [r["step"] for r in by_step][0] == 1
    assert "## Labels by step position" in found["artifacts-demo-build-summary"].data
    assert found["artifacts-demo-build-progress"].type == "progress"
    assert float(found["artifacts-demo-build-progress"].data) == 100.0


def test_a_corrected_source_is_not_resumed_from_stale_staging(small_config, tmp_path, monkeypatch):
    """Shards are keyed on whole problem rows: fixing a gold answer after a failed build must not reuse
    the staged shard computed against the old answer."""
    import flows.build as build_module

    question = "Ava has 5 apples. Then Ava gets 3 more apples. How many apples does Ava have at the end?"
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"question": question, "answer": "999"}) + "\n")
    cfg = small_config(source={"kind": "file", "path": str(src)})

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash before the commit")

    monkeypatch.setattr(build_module, "commit_task", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_dataset(cfg)
    monkeypatch.undo()
    assert list((tmp_path / "data" / "demo" / "_staging").glob("*/*/_DONE.json")), "the shard was staged"

    src.write_text(json.dumps({"question": question, "answer": "8"}) + "\n")
    fixed = build_dataset(cfg)
    assert fixed["shards_resumed"] == 0
    (problem,) = _table(tmp_path / "data", "demo", 1, "problems")
    assert problem["answer"] == "8"
    assert fixed["steps_positive"] > 0, "labels are computed against the corrected gold"


def test_a_missing_source_file_fails_before_any_work_naming_the_field(tmp_path):
    root = tmp_path / "data"
    result = CliRunner().invoke(app, ["build", "--set", f"storage.root={root}", "--set", "source.kind=gsm8k",
                                      "--set", f"source.path={tmp_path / 'missing.jsonl'}"])
    assert result.exit_code == 2, result.output
    assert "`source.path`" in result.output and "does not exist" in result.output
    assert not root.exists()


def test_policy_slots_hold_a_prefect_global_concurrency_limit(small_config, monkeypatch):
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import flows.build as build_module

    real_run_shard = build_module.run_shard
    lock, inside, peak = threading.Lock(), [0], [0]

    async def tracked(*args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            return await real_run_shard(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(build_module, "run_shard", tracked)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="stepforge-test-gpu", limit=1))
    summary = build_dataset(small_config(concurrency={"shards": 3, "policy_slots": "stepforge-test-gpu"},
                                         policy={"kind": "simulated", "latency_s": 0.05}))
    assert summary["shards"] == 3 and peak[0] == 1, "one slot: the shards ran one at a time"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("stepforge-test-gpu").active_slots == 0

    with pytest.raises(ConfigError, match="`concurrency.policy_slots`.*prefect gcl create"):
        build_dataset(small_config(dataset="other", concurrency={"policy_slots": "no-such-limit"}))


def test_the_progress_artifact_moves_while_a_shard_runs(small_config, monkeypatch):
    import flows.build as build_module
    import flows.commit as commit_module

    seen: list[float] = []
    real_update = commit_module.update_progress_artifact

    def record(artifact_id, value, *args, **kwargs):
        seen.append(value)
        return real_update(artifact_id, value, *args, **kwargs)

    monkeypatch.setattr(build_module, "_PROGRESS_EVERY_S", 0.02)
    monkeypatch.setattr(commit_module, "update_progress_artifact", record)
    # One shard; OmegaPRM's skipped problems finish after the probe, the searched ones many rounds later.
    build_dataset(small_config(dataset="progress-demo", shard_size=64, search={"algorithm": "omegaprm", "k": 4},
                               policy={"kind": "simulated", "step_error_rate": 0.3, "latency_s": 0.02}))
    assert seen[-1] == 100.0
    assert any(0.0 < v < 100.0 for v in seen), f"no update before the only shard finished: {seen[:5]}…"
