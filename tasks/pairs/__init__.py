"""Pair makers writing the `pairs` table, one module each: Step-DPO first-error pairs, tree sibling pairs
(rStar-Math / MCTS-DPO), ranked sibling groups, Lean-verified sibling pairs. `PairsConfig` (the build's
top-level `pairs` section) selects them; they run on every searched tree, whatever the algorithm (the
Lean-verified ones after the problem's formal check, `tasks/pairs/formal.py`)."""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field

from tasks.pairs import first_error, ranked, sibling
from tasks.pairs.first_error import FirstErrorPairsConfig
from tasks.pairs.formal import FormalPairsConfig
from tasks.pairs.ranked import RankedPairsConfig
from tasks.pairs.sibling import SiblingPairsConfig
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree

__all__ = ["PairsConfig", "FirstErrorPairsConfig", "SiblingPairsConfig", "RankedPairsConfig", "FormalPairsConfig",
           "make_pairs", "dedupe"]


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_error: FirstErrorPairsConfig = Field(default_factory=FirstErrorPairsConfig)
    sibling: SiblingPairsConfig = Field(default_factory=SiblingPairsConfig)
    ranked: RankedPairsConfig = Field(default_factory=RankedPairsConfig)
    formal: FormalPairsConfig = Field(default_factory=FormalPairsConfig)


def dedupe(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """First row per pair_id, in order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(row["pair_id"], row)
    return list(out.values())


async def make_pairs(engine: Engine, tree: Tree, leaves: list[Node], cfg: PairsConfig, *,
                     reward_scaled: bool) -> list[dict[str, Any]]:
    """`reward_scaled`: the algorithm's node values are already mean rewards in [-1, 1] (its registry
    record says so); otherwise they are c/k and are mapped onto that scale before comparing."""
    rows: list[dict[str, Any]] = []
    if cfg.first_error.enabled:
        rows += await first_error.make_pairs(engine, tree, leaves, cfg.first_error)
    if cfg.sibling.enabled:
        rows += sibling.make_pairs(engine, tree, cfg.sibling, reward_scaled)
    if cfg.ranked.enabled:
        rows += ranked.make_pairs(engine, tree, cfg.ranked, reward_scaled)
    return dedupe(rows)
