"""The `steps` table: one row per step of each solution path, from the raw statistics in the tree.

Only evidence and quantities derived from it without a threshold are written (k, c, c/k, Q, advantage);
hard labels are an export option."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from storage.schema import content_id
from storage.render import StepFormat
from tasks.search.tree import Node, Tree, first_error_index, reaches_answer

# (path, reaches_answer of the tree) -> the path's `q_value` column, or None for the default. The reach map
# is passed so every derived column uses the same "a rollout from the step or below it reached the answer"
# notion as `first_error_index`.
QValues = Callable[[Sequence[Node], Mapping[str, "bool | None"]], "list[float | None] | None"]


def solution_id(problem_id: str, leaf_id: str) -> str:
    return content_id("solution", problem_id, leaf_id)


def advantage(tree: Tree, node: Node) -> float | None:
    """PAV-style step advantage Q(s, a) - V(s): MC of the prefix ending with this step minus MC of the
    prefix before it, both from stored rollouts; None where either prefix has no evidence."""
    parent = tree.parent(node)
    q, v = node.mc, parent.mc if parent is not None else None
    return q - v if q is not None and v is not None else None


def step_rows(tree: Tree, leaves: Iterable[Node], fmt: StepFormat, label_source: str,
              q_values: QValues | None = None) -> list[dict[str, Any]]:
    """`q_values(path, reach)` may replace the `q_value` column (e.g. ReST-MCTS* targets); default: the node's
    backed-up Q where it has visits, else its MC value."""
    rows: list[dict[str, Any]] = []
    reach = reaches_answer(tree)
    for leaf in {leaf.node_id: leaf for leaf in leaves}.values():
        path = tree.path(leaf)
        sid = solution_id(tree.problem.problem_id, leaf.node_id)
        first_error = first_error_index(path, reach)
        qs = q_values(path, reach) if q_values is not None else None
        spans = fmt.spans([n.step_text for n in path])  # offsets in the canonical rendering exports write
        for i, (node, (start, end)) in enumerate(zip(path, spans)):
            mc = node.mc
            rows.append({
                "problem_id": tree.problem.problem_id, "solution_id": sid, "step_index": i,
                "step_text": node.step_text, "char_start": start, "char_end": end,
                "mc_k": node.rollouts, "mc_c": node.rollouts_correct, "mc_value": mc,
                "q_value": qs[i] if qs is not None else (node.q if node.visits else mc),
                "advantage": advantage(tree, node),
                "first_error_index": first_error, "judge_label": None, "formal_label": None, "verdicts": [],
                "consensus": None, "label_source": label_source,
            })
    return rows

