"""`build_dataset` with every search algorithm: a committed version with steps and pairs, the summary's
budgeting and cache fields, and same seed => same content hash."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
import pytest

from flows.build import build_dataset
from flows.config import load_config
from flows.summary import summary_rows

pytestmark = pytest.mark.usefixtures("prefect_server")

SEARCH = {
    "math-shepherd": {"algorithm": "math-shepherd", "num_solutions": 2, "k": 8},
    "omegaprm": {"algorithm": "omegaprm", "k": 8, "rollout_budget": 64, "num_searches": 6},
    "mcts": {"algorithm": "mcts", "iterations": 10, "k": 4},
}


def _rows(root: Path, table: str) -> list[dict]:
    return pads.dataset(str(root / "demo" / "v1" / table), format="parquet").to_table().to_pylist()


@pytest.mark.parametrize("algorithm", list(SEARCH))
def test_each_algorithm_commits_steps_and_pairs_deterministically(algorithm, small_config, tmp_path):
    cfg = small_config(search=SEARCH[algorithm], policy={"kind": "simulated", "step_error_rate": 0.3},
                       source={"kind": "synthetic", "num_problems": 16, "seed": 3})
    assert load_config(None, [f"search.algorithm={algorithm}"]).search.algorithm == algorithm
    first = build_dataset(cfg)
    root = tmp_path / "data"
    assert first["version"] == 1 and first["steps"] > 0 and first["pairs"] > 0
    assert first["searched"] + sum(first["skipped"].values()) == first["problems"] == 16
    if algorithm != "math-shepherd":
        assert sum(first["skipped"].values()) > 0, "probing skips problems without step signal"
        assert any("skipped" in value for key, value in summary_rows(first) if key == "searched")
    steps, pairs, nodes = _rows(root, "steps"), _rows(root, "pairs"), _rows(root, "nodes")
    assert len(steps) == first["steps"] and len(pairs) == first["pairs"]
    assert {n["algorithm"] for n in nodes} == {algorithm}
    assert all(s["label_source"] == algorithm for s in steps)
    assert any(s["advantage"] is not None for s in steps)
    assert len({p["pair_id"] for p in pairs}) == len(pairs)
    assert sum(first["pairs_by_kind"].values()) == first["pairs"]
    second = build_dataset(cfg)
    assert second["version"] == 2 and second["content_hash"] == first["content_hash"]
    assert second["cache_hits"] > 0 and second["rollouts"] == 0, "the rerun's rollouts come from the cache"
