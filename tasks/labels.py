"""The `steps` table: one row per step of each solution path, from the raw statistics in the tree.

Only evidence and quantities derived from it without a threshold are written (k, c, c/k, Q, advantage);
hard labels are an export option."""

from __future__ import annotations

from typing import Any, Iterable

from storage.schema import content_id
from tasks.search.tree import Node, Tree
from tasks.segment import StepFormat


def solution_id(problem_id: str, leaf_id: str) -> str:
    return content_id("solution", problem_id, leaf_id)


def step_rows(tree: Tree, leaves: Iterable[Node], fmt: StepFormat, label_source: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    v_root = tree.root.mc
    for leaf in {leaf.node_id: leaf for leaf in leaves}.values():
        path = tree.path(leaf)
        sid = solution_id(tree.problem.problem_id, leaf.node_id)
        # first_error_index: the first step from which no rollout reached the answer (c == 0).
        first_error = next((i for i, n in enumerate(path) if n.rollouts and n.rollouts_correct == 0), None)
        offset = 0
        prev_value = v_root
        for i, node in enumerate(path):
            head = fmt.label.format(i=i + 1) if fmt.label else ""
            start = offset + len(head)
            end = start + len(node.step_text)
            offset = end + len(fmt.separator)
            mc = node.mc
            rows.append({
                "problem_id": tree.problem.problem_id, "solution_id": sid, "step_index": i,
                "step_text": node.step_text, "char_start": start, "char_end": end,
                "mc_k": node.rollouts, "mc_c": node.rollouts_correct, "mc_value": mc,
                "q_value": node.q if node.visits else mc,
                "advantage": (mc - prev_value) if (mc is not None and prev_value is not None) else None,
                "first_error_index": first_error, "judge_label": None, "formal_label": None,
                "consensus": None, "label_source": label_source,
            })
            prev_value = mc
    return rows


def render_solution(tree: Tree, leaf: Node, fmt: StepFormat) -> str:
    """The solution text whose offsets `step_rows` reports."""
    return fmt.render(tree.steps(leaf))
