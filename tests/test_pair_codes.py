"""The pair filter's string codes (``pair_stream._codes_beside``): solution steps that no pair has share one code.
Checked through ``pair_keep_columns`` against ``consensus.pair_keep_mask`` with solutions drawing from more texts
than the pairs do, so several distinct absent steps (and absent steps followed by present ones) meet."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.consensus import Decision, pair_keep_mask
from storage.exports.pair_stream import _KEPT, pair_keep_columns


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_absent_solution_steps_share_a_code_and_change_nothing(data):
    pair_texts = st.sampled_from(["a", "b", None])
    sol_texts = st.sampled_from(["a", "b", None, "c", "d", ""])
    pids = st.sampled_from(["p1", "p2"])
    sols = data.draw(st.lists(st.tuples(pids, st.lists(sol_texts, min_size=1, max_size=4), st.integers(0, 4)), max_size=6))
    pairs = data.draw(st.lists(st.fixed_dictionaries({"problem_id": pids, "prefix_steps": st.one_of(st.none(), st.lists(pair_texts, max_size=3)),
                                                      "chosen": pair_texts, "rejected": pair_texts}), max_size=8))
    want = pair_keep_mask(pairs, [(p, t, Decision(True, f, "kept")) for p, t, f in sols])
    table = pa.table({"problem_id": pa.array([p["problem_id"] for p in pairs], pa.string()),
                      "prefix_steps": pa.array([p["prefix_steps"] for p in pairs], pa.list_(pa.string())),
                      "chosen": pa.array([p["chosen"] for p in pairs], pa.string()),
                      "rejected": pa.array([p["rejected"] for p in pairs], pa.string())})
    solutions = pa.Table.from_pylist([{"problem_id": p, "steps": t, "first_error": f} for p, t, f in sols], schema=_KEPT)
    mask, dropped = pair_keep_columns(table, solutions)
    assert (mask.tolist(), dropped) == want
