"""A shard's tables are built per tree as each tree finishes and merged at the end (`storage.schema.merge_tables`):
the same tables, to the byte, as converting every row at once (`to_table`), duplicates across trees included."""

from __future__ import annotations

import asyncio

import pytest

from storage.release import parquet_bytes
from storage.schema import merge_tables, to_table
from tasks.search.mcts import MCTSConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=8, seed=5)).problems


@pytest.fixture(scope="module")
def shard_tables(make_engine):
    async def go(cfg):
        return (await run_shard(PROBLEMS, make_engine(), cfg)).tables

    return {"omegaprm": asyncio.run(go(OmegaPRMConfig(k=4, rollout_budget=40))), "mcts": asyncio.run(go(MCTSConfig()))}


@pytest.mark.parametrize("algorithm", ["omegaprm", "mcts"])
@pytest.mark.parametrize("name", ["nodes", "steps", "pairs"])
def test_merging_per_tree_tables_gives_the_all_rows_table_byte_for_byte(shard_tables, algorithm, name):
    rows = shard_tables[algorithm][name].to_pylist()
    assert rows, "the shard wrote rows"
    by_problem: dict[str, list[dict]] = {}
    for row in reversed(rows):  # parts in another order than the sorted table's
        by_problem.setdefault(row["problem_id"], []).append(row)
    parts = list(by_problem.values())
    every_row = [row for part in parts for row in part]
    assert parquet_bytes(merge_tables(name, [to_table(name, p) for p in parts])) == parquet_bytes(to_table(name, every_row))
    # A key in two parts: the first part's row wins, as in `to_table`.
    changed = {**parts[-1][0], "problem_id": "zz-later-copy"}
    parts[-1] = parts[-1] + [parts[0][0]]
    parts[0] = parts[0] + [changed]
    every_row = [row for part in parts for row in part]
    assert parquet_bytes(merge_tables(name, [to_table(name, p) for p in parts])) == parquet_bytes(to_table(name, every_row))
    assert merge_tables(name, []).num_rows == 0
