"""Sibling pairs from the tree: two continuations of one prefix, compared by their values.

- `rstar` (rStar-Math): per node, up to `max_chosen` highest-valued children that reached the answer
  (c > 0) against up to `max_rejected` lowest-valued ones that never did (c = 0), each pair with value
  margin >= `min_margin` and edit distance >= `min_edit_distance`.
- `mcts-dpo` (Xie et al., 2024): per node, the best against the worst child, margin >= `min_margin`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.pairs.common import edit_distance, node_value, pair_row
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree

KIND = "sibling"


class SiblingPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Write sibling pairs from nodes with several evaluated children.")
    mode: Literal["rstar", "mcts-dpo"] = Field("rstar", description="`rstar`: up to 2 x 2 per node; `mcts-dpo`: best vs worst.")
    max_chosen: int = Field(2, ge=1, description="rstar: highest-valued children used as chosen per node.")
    max_rejected: int = Field(2, ge=1, description="rstar: lowest-valued children used as rejected per node.")
    min_margin: float = Field(0.5, ge=0.0, description="Least value difference chosen - rejected (node value scale: "
                                                       "MCTS Q in [-1, 1], MC c/k in [0, 1]).")
    min_edit_distance: int = Field(20, ge=0, description="rstar: least character edit distance between the two steps, "
                                                         "so pairs differ in more than wording.")


def evaluated_children(tree: Tree, node: Node) -> list[tuple[Node, float]]:
    """Children with evidence and their values, best first (ties by node id: deterministic)."""
    kids = [(c, node_value(c)) for c in tree.children(node)]
    kids = [(c, v) for c, v in kids if v is not None and c.rollouts]
    return sorted(kids, key=lambda cv: (-cv[1], cv[0].node_id))


def make_pairs(engine: Engine, tree: Tree, cfg: SiblingPairsConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for node in tree:
        kids = evaluated_children(tree, node)
        if len(kids) < 2:
            continue
        if cfg.mode == "mcts-dpo":
            (best, vb), (worst, vw) = kids[0], kids[-1]
            # A chosen step none of whose rollouts reached the answer has no evidence of being right.
            if best.rollouts_correct and vb - vw >= cfg.min_margin and vb > vw:
                rows.append(pair_row(engine, tree, node, best.step_text, worst.step_text, kind=KIND,
                                     chosen_value=vb, rejected_value=vw))
            continue
        chosen = [(c, v) for c, v in kids if c.rollouts_correct > 0][: cfg.max_chosen]
        rejected = [(c, v) for c, v in reversed(kids) if c.rollouts_correct == 0][: cfg.max_rejected]
        for c, vc in chosen:
            for r, vr in rejected:
                if vc - vr >= cfg.min_margin and edit_distance(c.step_text, r.step_text) >= cfg.min_edit_distance:
                    rows.append(pair_row(engine, tree, node, c.step_text, r.step_text, kind=KIND,
                                         chosen_value=vc, rejected_value=vr))
    return rows
