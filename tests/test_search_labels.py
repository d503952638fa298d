"""The steps table written from the tree: PAV-style advantages and first errors from stored evidence."""

from __future__ import annotations

import pytest

from tasks.labels import reaches_answer, step_rows
from tasks.problem import Problem
from tasks.search.tree import Tree
from storage.render import StepFormat


def test_advantage_is_q_minus_v_from_stored_mc_and_first_error_counts_descendants():
    tree = Tree(Problem("t", "Q?", "3"), "test", "p")
    tree.root.add_rollouts(8, 4)
    a, b, c = tree.add_path(["a", "b", "c"])
    a.add_rollouts(8, 6)
    b.add_rollouts(8, 0)  # none of b's own rollouts reached the answer...
    c.add_rollouts(1, 1)  # ...but the solution through b did: b is no error
    d = tree.child(a, "d")
    d.add_rollouts(8, 0)
    e = tree.child(d, "e")  # no evidence at all
    rows = {r["step_text"]: r for r in step_rows(tree, [c, e], StepFormat(), "test")}
    assert rows["a"]["advantage"] == pytest.approx(0.75 - 0.5)
    assert rows["b"]["advantage"] == pytest.approx(0.0 - 0.75)
    assert rows["c"]["advantage"] == pytest.approx(1.0 - 0.0)
    assert rows["e"]["advantage"] is None and rows["e"]["mc_value"] is None
    assert rows["b"]["first_error_index"] is None, "a correct continuation below b is a rollout from b"
    assert rows["d"]["first_error_index"] == 1 and rows["e"]["first_error_index"] == 1
    assert (rows["b"]["mc_k"], rows["b"]["mc_c"]) == (8, 0), "raw evidence is written as it is"
    reach = reaches_answer(tree)
    assert (reach[b.node_id], reach[d.node_id], reach[e.node_id]) == (True, False, None)
