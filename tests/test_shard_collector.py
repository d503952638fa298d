"""What a shard does around CPython's collector (`tasks/collector.py`) and its column-wise step counters
(`tasks.stats.step_profile`): the objects older than the running shards are set aside while they run and handed
back when the last one ends, a process's own freeze is left alone, and the counters are those of a running sum
over the rows, to the bit."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import threading

import pyarrow as pa
import pytest

from tasks.collector import old_objects_set_aside
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from tasks.stats import BuildStats, step_profile

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=6, seed=3)).problems


@pytest.fixture(autouse=True)
def nothing_frozen():
    gc.unfreeze()  # start from a process that froze nothing
    yield
    gc.unfreeze()


def test_a_shard_sets_older_objects_aside_while_it_runs_and_hands_them_back(make_engine):
    seen: list[int] = []

    async def go():
        engine = make_engine()
        task = asyncio.create_task(run_shard(PROBLEMS, engine, MathShepherdConfig(k=2, num_solutions=2)))
        while not task.done():  # while the shard's trees wait on their requests
            seen.append(gc.get_freeze_count())
            await asyncio.sleep(0)
        return await task

    assert gc.get_freeze_count() == 0
    result = asyncio.run(go())
    assert result.tables["steps"].num_rows > 0
    assert max(seen) > 0, "the older objects were out of the collector's reach during the shard"
    assert gc.get_freeze_count() == 0, "and back in it afterwards: nothing is kept for good"


def test_overlapping_shards_in_threads_unfreeze_once_the_last_one_ends():
    entered, release = threading.Event(), threading.Event()
    counts: list[int] = []

    def first():
        with old_objects_set_aside():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    with old_objects_set_aside():  # a second shard starts while the first runs
        counts.append(gc.get_freeze_count())
    counts.append(gc.get_freeze_count())  # the second ended, the first still runs
    release.set()
    t.join(10)
    assert counts[0] > 0 and counts[1] > 0
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_keeps_its_freeze(monkeypatch):
    gc.freeze()  # e.g. a fork server that froze its imports
    assert gc.get_freeze_count() > 0
    # The count itself is no witness: a frozen object still dies when its last reference goes (a background
    # thread of Prefect's did so in CI, 1618053 -> 1618052), so the calls into the collector are watched.
    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    with old_objects_set_aside():
        pass
    assert calls == [], "our entry must not freeze more, our exit must not unfreeze what someone else froze"
    assert gc.get_freeze_count() > 0


def _row_by_row(steps: pa.Table) -> BuildStats:
    """The counters as a running sum over the rows in table order (what `step_profile` computed before)."""
    out = BuildStats(steps=steps.num_rows)
    for row in steps.select(["step_index", "mc_k", "mc_c", "mc_value"]).to_pylist():
        key, c, mc = str(row["step_index"]), row["mc_c"], row["mc_value"]
        out.steps_positive += c > 0
        out.steps_unestimated += row["mc_k"] == 0
        out.by_index_steps[key] = out.by_index_steps.get(key, 0) + 1
        out.by_index_positive[key] = out.by_index_positive.get(key, 0) + (c > 0)
        if mc is not None:
            out.by_index_mc_sum[key] = out.by_index_mc_sum.get(key, 0.0) + mc
            out.by_index_mc_n[key] = out.by_index_mc_n.get(key, 0) + 1
    return out


def test_step_counters_are_the_running_sums_to_the_bit_keys_in_first_seen_order(make_engine):
    # OmegaPRM leaves steps between its probes unestimated (mc_value null): the null path is exercised.
    steps = asyncio.run(run_shard(PROBLEMS, make_engine(), OmegaPRMConfig(k=4, rollout_budget=40))).tables["steps"]
    assert steps.column("mc_value").null_count > 0
    shuffled = steps.take(pa.array(list(range(steps.num_rows))[::-1]))  # keys first seen in another order
    for table in (steps, shuffled, steps.slice(0, 0), steps.slice(3, 7)):
        want, got = dataclasses.asdict(_row_by_row(table)), dataclasses.asdict(step_profile(table))
        assert json.dumps(got) == json.dumps(want)  # values, types and key order
        assert all(type(got[k]) is type(want[k]) for k in want)
