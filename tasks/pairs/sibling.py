"""Sibling pairs from the tree: two continuations of one prefix, compared by their values.

- `rstar` (rStar-Math): per node, up to `max_chosen` highest-valued children that reached the answer
  (c > 0) against up to `max_rejected` lowest-valued ones that never did (c = 0), each pair with value
  margin >= `min_margin` and edit distance >= `min_edit_distance`.
- `mcts-dpo` (Xie et al., 2024): per node, the best against the worst child, margin >= `min_margin`.

Children are ranked and the margin tested on the common reward scale [-1, 1] (`common.reward_value`: MCTS's Q
as it is, 2 * c/k - 1 for Math-Shepherd and OmegaPRM), so one `min_margin` means the same for every
algorithm. The row's `chosen_value` / `rejected_value` / `margin` stay the nodes' own values (c/k for the MC
algorithms), like every other pair kind of the same tree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz.distance import Levenshtein

from tasks.pairs.common import node_value, pair_row, reward_value
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree

KIND = "sibling"


class SiblingPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Write sibling pairs from nodes with several evaluated children.")
    mode: Literal["rstar", "mcts-dpo"] = Field("rstar", description="`rstar`: up to 2 x 2 per node; `mcts-dpo`: best vs worst.")
    max_chosen: int = Field(2, ge=1, description="rstar: highest-valued children used as chosen per node.")
    max_rejected: int = Field(2, ge=1, description="rstar: lowest-valued children used as rejected per node.")
    min_margin: float = Field(0.5, ge=0.0, description="Least value difference chosen - rejected on the common reward "
                                                       "scale [-1, 1] (MCTS Q; 2 * c/k - 1 for MC algorithms).")
    min_edit_distance: int = Field(20, ge=0, description="rstar: least character edit distance between the two steps, "
                                                         "so pairs differ in more than wording.")


def evaluated_children(tree: Tree, node: Node, reward_scaled: bool) -> list[tuple[Node, float]]:
    """Children with evidence and their values on the reward scale, best first (ties by node id)."""
    kids = [(c, reward_value(c, reward_scaled)) for c in tree.children(node)]
    kids = [(c, v) for c, v in kids if v is not None and c.rollouts]
    return sorted(kids, key=lambda cv: (-cv[1], cv[0].node_id))


def _row(engine: Engine, tree: Tree, node: Node, chosen: Node, rejected: Node) -> dict[str, Any]:
    return pair_row(engine, tree, node, chosen.step_text, rejected.step_text, kind=KIND,
                    chosen_value=node_value(chosen), rejected_value=node_value(rejected))


def make_pairs(engine: Engine, tree: Tree, cfg: SiblingPairsConfig, reward_scaled: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for node in tree:
        kids = evaluated_children(tree, node, reward_scaled)
        if len(kids) < 2:
            continue
        if cfg.mode == "mcts-dpo":
            (best, vb), (worst, vw) = kids[0], kids[-1]
            # A chosen step none of whose rollouts reached the answer has no evidence of being right.
            if best.rollouts_correct and vb - vw >= cfg.min_margin and vb > vw:
                rows.append(_row(engine, tree, node, best, worst))
            continue
        chosen = [(c, v) for c, v in kids if c.rollouts_correct > 0][: cfg.max_chosen]
        rejected = [(c, v) for c, v in reversed(kids) if c.rollouts_correct == 0][: cfg.max_rejected]
        for c, vc in chosen:
            for r, vr in rejected:
                if vc - vr >= cfg.min_margin and Levenshtein.distance(c.step_text, r.step_text) >= cfg.min_edit_distance:
                    rows.append(_row(engine, tree, node, c, r))
    return rows
