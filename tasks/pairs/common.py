"""What every pair maker shares: the row it writes and the node value it compares."""

from __future__ import annotations

from typing import Any, Sequence

from storage.schema import pair_id
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree


def node_value(node: Node) -> float | None:
    """The node's backed-up value: mean reward over visits (MCTS: in [-1, 1]; Math-Shepherd and OmegaPRM
    count rollouts as visits, so it is c/k in [0, 1]); c/k where nothing was backed up; None without
    evidence."""
    if node.visits:
        return node.value_sum / node.visits
    return node.mc


def reward_value(node: Node, reward_scaled: bool) -> float | None:
    """The node value on the common reward scale [-1, 1]: as it is where the algorithm's values already are
    mean rewards (`reward_scaled`, its registry record's capability: MCTS), 2 * (c/k) - 1 for the MC
    algorithms. Thresholds such as the sibling margin are stated on this scale, so `min_margin = 0.5` means
    the same for every algorithm (rStar-Math's 0.5 on Q in [-1, 1], i.e. 0.25 of c/k)."""
    v = node_value(node)
    if v is None or reward_scaled:
        return v
    return 2.0 * v - 1.0


def pair_row(engine: Engine, tree: Tree, prefix: Node, chosen: str, rejected: str, *, kind: str,
             chosen_value: float | None, rejected_value: float | None, full_chosen: Sequence[str] | None = None,
             full_rejected: Sequence[str] | None = None, group_id: str | None = None, rank: int | None = None,
             id_prefix: str | None = None) -> dict[str, Any]:
    """One `pairs` row. `full_*` are the steps from the chosen/rejected step to the end of its solution
    (default: the step alone), rendered with the step format so they continue the prefix verbatim."""
    prefix_steps = tree.steps(prefix)
    start = len(prefix_steps)
    fmt = engine.fmt
    margin = (chosen_value - rejected_value) if chosen_value is not None and rejected_value is not None else None
    return {
        "pair_id": pair_id(id_prefix or prefix.node_id, chosen, rejected),
        "problem_id": tree.problem.problem_id,
        "prompt": engine.render(tree.problem, []),
        "prefix_steps": prefix_steps,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_value": chosen_value,
        "rejected_value": rejected_value,
        "margin": margin,
        "full_chosen": fmt.render(list(full_chosen or [chosen]), start=start),
        "full_rejected": fmt.render(list(full_rejected or [rejected]), start=start),
        "answer": tree.problem.answer,
        "kind": kind,
        "group_id": group_id,
        "rank": rank,
    }
