"""PRM exports of an OmegaPRM release: the steps between binary-search probes (k = 0) get labels implied by
the stored evidence, and on the synthetic domain no step so labelled good is wrong per the oracle."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from storage.exports import EXPORTERS, parse_options
from storage.exports.base import ReleaseData
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question


def test_omegaprm_release_exports_whole_solutions_whose_good_steps_are_right(make_engine):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=24, seed=3)).problems
    engine = make_engine()
    prompt = engine.prompt

    async def go():
        return await run_shard(problems, engine, OmegaPRMConfig(k=16))

    tables = asyncio.run(go()).tables
    assert any(k == 0 for k in tables["steps"]["mc_k"].to_pylist()), "OmegaPRM leaves steps unestimated"
    manifest = {"dataset": "omega", "version": 1, "config": {"prompt": prompt.model_dump(mode="json")}}
    data = ReleaseData(manifest, tables)
    inferred = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm"))
    dropped = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"unestimated": "drop"}))
    # Every solution that `drop` leaves out for its k = 0 steps comes back with inferred labels.
    assert inferred.stats["solutions_with_inferred_steps"] == dropped.stats["dropped_solutions_without_mc"] > 10
    assert inferred.table.num_rows == dropped.table.num_rows + inferred.stats["solutions_with_inferred_steps"]

    specs = {p.question: parse_question(p.question)[0] for p in problems}
    checked: dict[str, int] = defaultdict(int)
    for row in inferred.table.to_pylist():
        fe = first_error(specs[row["prompt"]], row["completions"])
        for i, good in enumerate(row["labels"]):
            if good:
                assert fe is None or i < fe, "a step labelled good is right per the oracle"
                checked["good"] += 1
            else:
                checked["bad"] += 1
    assert checked["good"] > 20 and checked["bad"] > 10, checked
