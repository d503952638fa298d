"""Dedup and decontamination of problems inside `stepforge build`, before search: a source seeded with exact
and near copies of GSM8K test problems (tests/fixtures/seeded_source.jsonl: six synthetic problems, two exact
and two near copies of tests/fixtures/gsm8k/test.jsonl, one exact and one near copy of its own problems)
loses exactly the copies, and the manifest lists each with its reason and its match."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from flows.build import build_dataset
from flows.components import verify
from storage.errors import ConfigError
from storage.objectstore import open_store
from storage.release import read_manifest

pytestmark = pytest.mark.usefixtures("prefect_server")

FIXTURES = Path(__file__).parent / "fixtures"
SEEDED = FIXTURES / "seeded_source.jsonl"
GSM8K_TEST = FIXTURES / "gsm8k" / "test.jsonl"


def _config(small_config, **changes):
    return small_config(source={"kind": "file", "path": str(SEEDED), "fields": {"id": "id"}}, **changes)


def _source_ids(root: Path, version: int) -> dict[str, str]:
    rows = pads.dataset(str(root / "demo" / f"v{version}" / "problems"), format="parquet").to_table().to_pylist()
    return {r["problem_id"]: json.loads(r["metadata"])["source_id"] for r in rows}


def test_build_drops_copies_before_search_and_lists_them_in_the_manifest(small_config, tmp_path):
    seeded = {r["id"]: r["question"] for r in map(json.loads, SEEDED.read_text(encoding="utf-8").splitlines())}
    summary = build_dataset(_config(small_config, dedup={"enabled": True},
                                    decontaminate={"benchmarks": [str(GSM8K_TEST)]}))
    root = tmp_path / "data"
    kept = _source_ids(root, 1)
    assert sorted(kept.values()) == [f"clean-{i}" for i in range(6)]
    assert summary["problems"] == 6 and summary["searched"] > 0
    assert summary["problems_dropped"] == {"contaminated": 4, "exact-duplicate": 1, "near-duplicate": 1}
    manifest = read_manifest(open_store(str(root)), "demo", 1)
    filters = manifest["problem_filters"]
    assert filters["dropped"] == 6 and filters["by_reason"] == summary["problems_dropped"]
    # Every dropped record: which problem (its id, source record and text), why, and what it matched.
    by_name = {r["source_id"]: r for r in filters["records"]}
    assert len(by_name) == 6
    id_of = {v: k for k, v in kept.items()}
    for name in ("bench-exact-0", "bench-exact-1", "bench-near-0", "bench-near-1"):
        record = by_name[name]
        assert record["question"] == seeded[name].strip()[:200]
        assert record["reason"] == "contaminated", name
        original = {"bench-exact-0": 1, "bench-exact-1": 2, "bench-near-0": 3, "bench-near-1": 6}[name]
        assert record["match"] == f"test.jsonl:{original}"
        assert (record["similarity"] == 1.0) == name.startswith("bench-exact")
    assert (by_name["dup-exact"]["reason"], by_name["dup-exact"]["match"]) == ("exact-duplicate", id_of["clean-3"])
    assert (by_name["dup-near"]["reason"], by_name["dup-near"]["match"]) == ("near-duplicate", id_of["clean-0"])
    assert all(r["id"] not in kept for r in filters["records"]), "a dropped problem is not in the release"
    card = (root / "demo" / "v1" / "README.md").read_text()
    assert "6 source problems left out before search (4 contaminated, 1 exact-duplicate, 1 near-duplicate)" in card


def test_overlap_n_and_threshold_are_configurable_and_filters_are_off_by_default(small_config, tmp_path):
    # bench-near-1 shares 62 % of its 8-grams with GSM8K test line 6: a 0.7 threshold keeps it.
    build_dataset(_config(small_config, decontaminate={"benchmarks": [str(GSM8K_TEST)], "threshold": 0.7}))
    manifest = read_manifest(open_store(str(tmp_path / "data")), "demo", 1)
    assert manifest["problem_filters"]["by_reason"] == {"contaminated": 3}
    assert "bench-near-1" in _source_ids(tmp_path / "data", 1).values()
    assert "dup-exact" in _source_ids(tmp_path / "data", 1).values(), "dedup is off unless enabled"
    # Shorter n-grams survive the one-word edits better: at n = 3 the same threshold catches it.
    build_dataset(_config(small_config, decontaminate={"benchmarks": [str(GSM8K_TEST)], "threshold": 0.7, "n": 3}))
    assert read_manifest(open_store(str(tmp_path / "data")), "demo", 2)["problem_filters"]["by_reason"] == {
        "contaminated": 4}
    build_dataset(_config(small_config))
    assert read_manifest(open_store(str(tmp_path / "data")), "demo", 3)["problem_filters"] == {
        "dropped": 0, "by_reason": {}, "records": []}


def test_preflight_names_a_missing_benchmark_file(small_config, tmp_path):
    cfg = _config(small_config, decontaminate={"benchmarks": [str(tmp_path / "nope.jsonl")]})
    with pytest.raises(ConfigError, match="nope.jsonl.*does not exist") as info:
        verify(cfg)
    assert info.value.field == "decontaminate.benchmarks"
    assert not (tmp_path / "data").exists()
