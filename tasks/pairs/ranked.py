"""Ranked groups of siblings for list-wise (TPO-style) training: the evaluated children of one node,
ordered by value. A group is written as rows of adjacent pairs: the row of rank r has the child ranked r
as chosen and the one ranked r+1 as rejected, all rows sharing `group_id`, so the ranking reads back
with `ORDER BY rank`. Adjacent children of equal value get no row (no preference between them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage.schema import content_id
from tasks.pairs.common import node_value, pair_row
from tasks.pairs.sibling import evaluated_children
from tasks.search.engine import Engine
from tasks.search.tree import Tree

KIND = "ranked"


class RankedPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Write ranked groups of sibling steps.")
    min_group: int = Field(3, ge=2, description="Fewest evaluated children a node needs to form a group.")


def make_pairs(engine: Engine, tree: Tree, cfg: RankedPairsConfig, reward_scaled: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for node in tree:
        kids = evaluated_children(tree, node, reward_scaled)
        if len(kids) < cfg.min_group or kids[0][1] == kids[-1][1]:
            continue
        group = content_id("ranked-group", node.node_id)
        for rank, ((hi, vh), (lo, vl)) in enumerate(zip(kids, kids[1:])):
            if vh > vl:
                # Namespaced ids: a group member is not the same record as an equal sibling pair, and
                # deduplication by pair_id must not punch holes into a ranking.
                # Ranked on the reward scale (an order-preserving map of c/k), written as the nodes' own values.
                rows.append(pair_row(engine, tree, node, hi.step_text, lo.step_text, kind=KIND,
                                     chosen_value=node_value(hi), rejected_value=node_value(lo), group_id=group,
                                     rank=rank, id_prefix=f"{node.node_id}:ranked"))
    return rows
