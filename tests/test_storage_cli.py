"""`stepforge datasets` end to end on a real build: export every format, verify (and catch corruption),
gc, diff, publish --dry-run, and clear one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def built(small_config, tmp_path) -> Path:
    from flows.build import build_dataset

    build_dataset(small_config(source={"kind": "synthetic", "num_problems": 8, "seed": 0}))
    return tmp_path / "data"


def _run(root: Path, *args: str):
    return CliRunner().invoke(app, ["datasets", "--root", str(root), *args])


def test_cli_exports_verifies_diffs_and_cleans_a_real_build(built, tmp_path):
    from datasets import load_dataset

    for fmt in ("trl-prm", "math-shepherd", "prm800k", "trl-dpo", "step-dpo", "rstar-ppm"):
        out = tmp_path / "exports" / fmt
        res = _run(built, "export", "demo@v1", "--format", fmt, "--out", str(out))
        assert res.exit_code == 0, res.output
        record = json.loads((out / "export.json").read_text())
        ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.column_names == [c["name"] for c in record["columns"]] and len(ds) == record["rows"]
        if fmt in ("trl-prm", "math-shepherd", "prm800k"):
            assert record["rows"] > 0  # the build labels steps; pair formats may be empty while pairs are
    # The exporters render prompts from the manifest's Jinja without importing tasks/: they must agree
    # with the build's own rendering, which the pair makers stored in `pairs.prompt`.
    from storage.exports.base import load_release
    from storage.objectstore import open_store

    data = load_release(open_store(str(built)), "demo", 1)
    for pair in data.table("pairs").to_pylist():
        assert data.renderer.prompt(data.problems[pair["problem_id"]]["question"], []) == pair["prompt"]
    res = _run(built, "export", "demo@v1", "--format", "trl-prm", "--out", str(tmp_path / "soft"), "--option", "labels=soft")
    assert res.exit_code == 0 and "int()" in res.output
    card = (tmp_path / "soft" / "README.md").read_text()
    assert "labels: soft" in card and "seed: `0`" in card
    res = _run(built, "export", "demo@v1", "--format", "step-dpo", "--out", str(tmp_path / "maj"), "--option", "consensus=majority",
               "--dedup")
    assert res.exit_code == 0 and "consensus majority: kept" in res.output, res.output
    assert "filters: 0 problems left out" in res.output  # 8 distinct synthetic problems
    assert json.loads((tmp_path / "maj" / "export.json").read_text())["stats"]["consensus"]["rule"] == "majority"
    res = _run(built, "export", "demo@v1", "--format", "trl-prm", "--out", str(tmp_path / "x"), "--option", "treshold=1")
    assert res.exit_code == 2 and "trl-prm.treshold" in res.output

    assert _run(built, "verify", "demo@v1").exit_code == 0
    res = _run(built, "show", "demo")
    assert res.exit_code == 0 and "label balance" in res.output
    res = _run(built, "publish", "demo@v1", "--repo", "org/demo", "--dry-run", "--folder", str(tmp_path / "hub"),
               "--export", "trl-prm", "--option", "trl-prm.threshold=0.5")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hub" / "trl_prm" / "train-00000.parquet").is_file() and "dry run" in res.output

    # Two datasets built from the same problems (here: another algorithm) diff like two versions.
    from flows.build import build_dataset
    from flows.config import BuildConfig

    omega = BuildConfig.model_validate({"dataset": "omega", "source": {"kind": "synthetic", "num_problems": 8, "seed": 0},
                                        "search": {"algorithm": "omegaprm", "k": 4}, "storage": {"root": str(built)}})
    build_dataset(omega)
    res = _run(built, "diff", "demo@v1", "omega@v1", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["metric"]: r for r in json.loads(res.output)}
    assert rows["problems added"]["b"] == 0 and rows["problems removed"]["a"] == 0
    assert rows["content hash"]["delta"] == "changed" and rows["pairs rows"]["b"] > 0
    res = _run(built, "diff", "demo@v1", "omega@v1")
    assert res.exit_code == 0 and "demo@v1 → omega@v1" in res.output

    part = built / "demo" / "v1" / "steps" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    res = _run(built, "verify", "demo@v1")
    assert res.exit_code == 1 and "sha256 mismatch: steps/part-00000.parquet" in res.output
    res = _run(built, "diff", "demo@v1", "omega@v1")
    assert res.exit_code == 2 and "cannot be read" in res.output and "datasets verify" in res.output

    (built / "demo" / "_staging" / "dead" / "s0").mkdir(parents=True)
    (built / "demo" / "_staging" / "dead" / "s0" / "steps.parquet").write_bytes(b"x")
    res = _run(built, "gc", "demo", "--older-than", "0")
    assert res.exit_code == 0 and "removed demo/_staging/dead/" in res.output
    assert not (built / "demo" / "_staging" / "dead").exists() and (built / "demo" / "v1" / "manifest.json").exists()


@pytest.mark.parametrize("args,message", [
    (["verify", "../etc@v1"], "`dataset` must be"),
    (["verify", "demo@v9"], "demo@v9 does not exist"),
    (["diff", "demo@v1", "other@v1"], "other@v1 does not exist"),
    (["diff", "nope", "demo@v1"], "has no committed version"),
    (["export", "demo@v1", "--format", "csv", "--out", "x"], "`format` must be one of"),
    (["publish", "demo@v1", "--repo", "not-a-repo", "--dry-run"], "`repo` must look like org/name"),
    (["sql", "SELECT * FROM nope"], "query failed"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    from storage.objectstore import open_store
    from test_catalog import _commit

    root = tmp_path / "data"
    _commit(open_store(str(root)))
    res = _run(root, *args)
    assert res.exit_code == 2 and message in res.output, res.output
