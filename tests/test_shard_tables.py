"""A shard's rows become Arrow in batches as its trees finish (`storage.schema.RowBatches`), merged at the end:
the same tables, to the byte, as converting every row at once (`to_table`), keys repeated across trees included."""

from __future__ import annotations

import asyncio

import pytest

from storage.release import parquet_bytes
from storage.schema import RowBatches, to_table
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
    parts[0] = parts[0] + parts[0][:1]  # a key twice in one group: its first row stays

    def merged(batch: int):
        batches = RowBatches(name, batch=batch)
        for part in parts:
            batches.add(part)
        return batches.table(lambda: (row for part in parts for row in part))

    every_row = [row for part in parts for row in part]
    for batch in (1, 7, 10_000):
        assert parquet_bytes(merged(batch)) == parquet_bytes(to_table(name, every_row))
    # A key in two groups: the earlier group's row wins, as in `to_table`, whatever the batches.
    changed = {**parts[-1][0], "problem_id": "zz-later-copy"}
    parts[-1] = parts[-1] + [parts[0][0]]
    parts[0] = parts[0] + [changed]
    every_row = [row for part in parts for row in part]
    for batch in (1, 7, 10_000):
        assert parquet_bytes(merged(batch)) == parquet_bytes(to_table(name, every_row))
    assert RowBatches(name).table(list).num_rows == 0
