"""Consensus in the build's report: the pairwise agreement of MC, the judge and the step check on each
solution's first error, and the share each consensus rule keeps, added up over shards, in the summary, the
manifest and a Prefect table artifact; checked against the same report computed over the whole release."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from flows.build import build_dataset
from flows.summary import summary_rows
from storage.exports.labels import consensus_summary
from storage.objectstore import open_store
from storage.release import read_manifest

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_build_reports_agreement_and_kept_shares_over_all_shards(small_config, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    # Three shards, noise on (recovery and lucky answers), so MC and the judge disagree on some solutions.
    summary = build_dataset(small_config(
        dataset="consensus-demo", source={"num_problems": 24, "seed": 3},
        policy={"kind": "simulated", "step_error_rate": 0.3, "recovery_rate": 0.3, "lucky_rate": 0.2}))
    root = tmp_path / "data"
    steps = pads.dataset(str(root / "consensus-demo" / "v1" / "steps"), format="parquet").to_table()
    whole = consensus_summary(steps)
    report = summary["consensus_summary"]
    assert report == whole, "per-shard counts add up to the report over the whole release"
    assert report["solutions"] == len(set(steps["solution_id"].to_pylist()))
    pairs = {(p["a"], p["b"]): p for p in report["agreement"]}
    assert set(pairs) == {("mc", "judge"), ("mc", "check"), ("judge", "check")}
    assert all(0 < p["both_decided"] <= report["solutions"] for p in pairs.values())
    assert 0 < pairs[("mc", "judge")]["rate"] < 1, "noise makes MC and the judge disagree on some solutions"
    shares = report["kept_share"]
    assert set(shares) == {"none", "mc-and-judge", "mc-and-check", "majority"}, "no Lean verdicts: no mc-and-formal"
    assert shares["none"] == 1.0 and 0 < shares["mc-and-judge"] < 1
    # mc-and-judge keeps exactly the solutions on which both are decided and agree.
    assert shares["mc-and-judge"] == round(pairs[("mc", "judge")]["agree"] / report["solutions"], 4)
    assert read_manifest(open_store(str(root)), "consensus-demo", 1)["consensus"] == report
    rows = dict(summary_rows(summary))
    assert f"mc-and-judge {shares['mc-and-judge']:.0%}" in rows["consensus keeps"]
    assert f"mc~judge {pairs[('mc', 'judge')]['rate']:.0%}" in rows["first-error agreement"]

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["consensus-demo-consensus"])))
    table = {r["measure"]: r for r in json.loads(artifact.data)}
    assert table["agreement mc ~ judge"]["count"] == pairs[("mc", "judge")]["agree"]
    assert table["agreement mc ~ judge"]["solutions"] == pairs[("mc", "judge")]["both_decided"]
    assert table["kept by mc-and-judge"]["count"] == pairs[("mc", "judge")]["agree"]
    assert table["kept by none"]["share"] == "100.0%"


def test_no_step_verifiers_no_consensus_report(small_config):
    summary = build_dataset(small_config(checks=[], judge={"enabled": False}))
    assert summary["consensus_summary"] == {}
    assert "consensus keeps" not in dict(summary_rows(summary))
