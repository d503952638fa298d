"""Exports of a MUSTARD-style release (`lean-proofs`, `lean-revision-dpo`), from a release committed through
the release protocol with the loop's real rows; every exported pair re-checked by the stand-in Lean REPL (not
Lean): the chosen file is valid, the rejected one invalid."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import datasets
import pytest

from storage.exports import EXPORTERS, parse_options, run_export
from storage.exports.base import ReleaseData
from storage.objectstore import open_store
from storage.release import commit_release, stage_shard
from storage.schema import to_table
from tasks.mustard.concepts import expand_seeds, load_concepts
from tasks.mustard.pipeline import LoopSettings, rows, run_mustard
from tasks.mustard.texts import lean_file
from tasks.policy.simulated_author import SimulatedAuthor
from tasks.prompt import load_template
from verifiers.base import Status
from verifiers.lean.repl import LeanReplConfig, LeanReplVerifier

STANDIN = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]


def checker() -> LeanReplVerifier:
    return LeanReplVerifier(LeanReplConfig(command=STANDIN, max_repls=2, max_repl_mem_mb=None))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean-exports")
    seeds = expand_seeds(load_concepts(levels=["middle school", "high school"]), 3)
    settings = LoopSettings(2, 0.7, 2048, "import Mathlib", 0, load_template("mustard-author"),
                            load_template("mustard-revise"))

    async def go():
        c = checker()
        try:
            return await run_mustard(seeds, SimulatedAuthor(), c, settings)
        finally:
            await c.aclose()

    problems, records = rows(asyncio.run(go()), "simulated-author/test")
    store = open_store(str(root / "data"))
    stage_shard(store, "mustard", "bk", "s0", {"problems": to_table("problems", problems),
                                              "mustard": to_table("mustard", records)})
    commit_release(store, "mustard", build_key="bk", shard_keys=["s0"], manifest_fields={}, card="card")
    return root, store, records


def test_lean_proofs_export_reads_with_datasets(release) -> None:
    root, store, records = release
    rec = run_export(store, "mustard", 1, "lean-proofs", str(root / "proofs"))
    assert rec["rows"] == len(records) > 0
    ds = datasets.load_dataset("parquet", data_files=str(root / "proofs/data/*.parquet"), split="train")
    assert ds.column_names == ["prompt", "completion", "concept", "level", "revisions"]
    by_completion = {r["formal_proof"]: r for r in records}
    for row in ds:
        r = by_completion[row["completion"]]
        assert r["problem"] in row["prompt"] and r["informal_proof"] in row["prompt"]
        assert row["prompt"].endswith("Formal proof:\n") and row["revisions"] == r["revisions"]
    bare = run_export(store, "mustard", 1, "lean-proofs", str(root / "bare"),
                      {"with_informal": False, "max_revisions": 0})
    assert bare["rows"] == sum(r["revisions"] == 0 for r in records) < len(records)
    # Dedup at export leaves out the records of dropped problems only (the mustard table is filtered too).
    from storage.dedup import DedupConfig

    deduped = run_export(store, "mustard", 1, "lean-proofs", str(root / "dedup"), dedup=DedupConfig(enabled=True))
    dropped = {r["id"] for r in deduped["filters"]["records"]}
    assert deduped["rows"] == sum(r["problem_id"] not in dropped for r in records) > 0


def test_revision_pairs_are_lean_checked_on_both_sides(release) -> None:
    root, store, records = release
    rec = run_export(store, "mustard", 1, "lean-revision-dpo", str(root / "dpo"))
    expected = sum(sum(v["status"] == "invalid" for v in r["verdicts"][:-1]) for r in records)
    assert rec["rows"] == expected > 0
    ds = datasets.load_dataset("parquet", data_files=str(root / "dpo/data/*.parquet"), split="train")
    items = [lean_file(t, "import Mathlib").item for row in ds for t in (row["chosen"], row["rejected"])]

    async def go():
        c = checker()
        try:
            return await c.check(items)
        finally:
            await c.aclose()

    outcomes = asyncio.run(go())
    assert [o.status for o in outcomes] == [Status.VALID, Status.INVALID] * len(ds)
    conv = EXPORTERS["lean-revision-dpo"].fn(_data(store), parse_options("lean-revision-dpo", {"style": "conversational"}))
    first = conv.table.to_pylist()[0]
    assert first["prompt"][0]["role"] == "user" and first["chosen"][0]["role"] == "assistant"


def _data(store) -> ReleaseData:
    from storage.exports.base import load_release

    return load_release(store, "mustard", 1)


def test_a_build_release_exports_no_lean_rows() -> None:
    data = ReleaseData({"dataset": "demo", "version": 1})
    for fmt in ("lean-proofs", "lean-revision-dpo"):
        assert EXPORTERS[fmt].fn(data, parse_options(fmt)).table.num_rows == 0
