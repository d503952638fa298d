"""`diff_versions` on hand-made releases: problems/steps added and removed, label balance, MC shift, pairs."""

from __future__ import annotations

import json

import pytest

from storage.diff import diff_versions
from storage.objectstore import open_store
from storage.release import commit_release, stage_shard
from storage.schema import to_table
from test_exports import _pair, _problems, _step


def _release(store, build, steps, pairs):
    stage_shard(store, "demo", build, "s0", {"problems": _problems(), "steps": to_table("steps", steps), "pairs": to_table("pairs", pairs)})
    return commit_release(store, "demo", build_key=build, shard_keys=["s0"], manifest_fields={}, card="# c\n")


def test_diff_reports_added_removed_balance_mc_and_pairs(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _release(store, "b1", [_step("p1", "s1", 0, "a", 4, 0), _step("p1", "s1", 1, "b", 4, 4)],
             [_pair("p1", [], "x", "y", "sibling")])
    _release(store, "b2", [_step("p1", "s1", 0, "a", 4, 0), _step("p2", "s2", 0, "c", 4, 2), _step("p2", "s2", 1, "d", 4, 4)],
             [_pair("p1", [], "x", "y", "sibling"), _pair("p2", [], "c", "e", "first_error")])
    rows = {r.metric: (r.a, r.b, r.delta) for r in diff_versions(store, "demo", 1, 2)}
    assert rows["steps rows"] == (2, 3, 1)
    assert rows["steps added"][1] == 2 and rows["steps removed"][0] == 1
    assert rows["problems added"][1] == 0 and rows["problems removed"][0] == 0
    assert rows["label balance (c > 0)"] == (0.5, pytest.approx(2 / 3, abs=1e-6), pytest.approx(2 / 3 - 0.5, abs=1e-6))
    assert rows["mean MC value"] == (0.5, 0.5, 0.0)
    assert rows["pairs: sibling"] == (1, 1, 0) and rows["pairs: first_error"] == (0, 1, 1) and rows["pairs: ranked"] == (0, 0, 0)
    assert rows["content hash"][2] == "changed"


def test_cli_diff_prints_a_table_of_the_same_metrics(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    store = open_store(str(tmp_path / "data"))
    _release(store, "b1", [_step("p1", "s1", 0, "a", 4, 0), _step("p1", "s1", 1, "b", 4, 4)], [_pair("p1", [], "x", "y", "sibling")])
    _release(store, "b2", [_step("p1", "s1", 0, "a", 4, 0), _step("p2", "s2", 0, "c", 4, 2), _step("p2", "s2", 1, "d", 4, 4)],
             [_pair("p1", [], "x", "y", "sibling"), _pair("p2", [], "c", "e", "first_error")])
    res = CliRunner().invoke(app, ["datasets", "--root", str(tmp_path / "data"), "diff", "demo@v1", "demo@v2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "demo: v1 → v2" in lines[0]
    header = next(line for line in lines if "metric" in line)
    assert header.index("demo@v1") < header.index("demo@v2") < header.index("delta")

    def row(metric: str) -> list[str]:
        line = next(line for line in lines if line.strip("│┃ ").startswith(metric))
        return [cell.strip() for cell in line.strip("│┃ ").split("│")]

    assert row("steps rows") == ["steps rows", "2", "3", "1"]
    assert row("steps added")[2] == "2" and row("steps removed")[1] == "1"
    assert row("pairs: first_error") == ["pairs: first_error", "0", "1", "1"]
    assert row("content hash")[3] == "changed"
    # Every metric of the JSON output is a row of the table.
    as_json = CliRunner().invoke(app, ["datasets", "--root", str(tmp_path / "data"), "diff", "--json", "demo@v1", "demo@v2"])
    for metric in (r["metric"] for r in json.loads(as_json.stdout)):
        assert row(metric)[0] == metric
