"""Step-DPO first-error pairs (Lai et al., 2024): prefix = the steps before a solution's first error,
rejected = the erroneous step, chosen = the first step of a continuation sampled from the same prefix
whose final answer is the gold one.

The first error is read from the stored evidence (the first step none of whose rollouts reached the
answer, as in `labels.step_rows`); the chosen continuation is one of the prefix's own rollouts, re-read
through the engine (a memo or cache hit), else a correct finished path below the prefix in the tree; fresh
continuations are sampled only if `extra_samples` > 0."""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field

from storage.schema import node_id as make_node_id
from tasks.pairs.common import pair_row
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree, first_error_index, reaches_answer

KIND = "first_error"


class FirstErrorPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Write Step-DPO first-error pairs.")
    extra_samples: int = Field(
        0, ge=0, description="If none of the prefix's stored rollouts is correct, sample this many fresh "
        "continuations (one request) to find a chosen step; 0 = only reuse stored rollouts.")
    max_per_prefix: int = Field(1, ge=1, description="Distinct chosen steps per (prefix, rejected step).")


async def make_pairs(engine: Engine, tree: Tree, leaves: Iterable[Node], cfg: FirstErrorPairsConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    reach = reaches_answer(tree)
    for leaf in {leaf.node_id: leaf for leaf in leaves}.values():
        path = tree.path(leaf)
        e = first_error_index(path, reach)
        if e is None:
            continue
        prefix = path[e - 1] if e > 0 else tree.root
        rejected = path[e]
        if (prefix.node_id, rejected.step_text) in seen:
            continue  # several solutions sharing one first error give one pair
        seen.add((prefix.node_id, rejected.step_text))
        continuations = await _correct_continuations(engine, tree, prefix, cfg)
        continuations += _tree_continuations(tree, prefix, reach)
        chosen_steps_seen: set[str] = set()
        for steps in continuations:
            chosen = steps[0]
            if chosen == rejected.step_text or chosen in chosen_steps_seen:
                continue
            chosen_steps_seen.add(chosen)
            known = tree.nodes.get(make_node_id(prefix.node_id, chosen))
            rows.append(pair_row(
                engine, tree, prefix, chosen, rejected.step_text, kind=KIND,
                chosen_value=known.mc if known is not None else None, rejected_value=rejected.mc,
                full_chosen=steps, full_rejected=[n.step_text for n in path[e:]]))
            if len(chosen_steps_seen) >= cfg.max_per_prefix:
                break
    return rows


async def _correct_continuations(engine: Engine, tree: Tree, prefix: Node, cfg: FirstErrorPairsConfig) -> list[list[str]]:
    """Segmented continuations of `prefix` whose final answer is right, in sampling order."""
    out: list[list[str]] = []
    requests = list(prefix.estimates) if prefix.rollouts_correct else []
    if not requests and cfg.extra_samples:
        requests = [("chosen", cfg.extra_samples)]
    for purpose, n in requests:
        stats = await engine.rollouts(tree.problem, tree.prefix(prefix), n, purpose=purpose)
        for comp, verdict in zip(stats.completions, stats.verdicts):
            if verdict.is_valid:
                steps = [s.text for s in engine.segments(comp)]
                if steps:
                    out.append(steps)
    return out


def _tree_continuations(tree: Tree, prefix: Node, reach: dict[str, bool | None]) -> list[list[str]]:
    """Fallback when no rollout of the prefix itself was correct but a path below it was: continuations
    along the tree to a finished solution with the right answer (the evidence `reach` counted)."""
    out: list[list[str]] = []
    for leaf in tree:
        if leaf.is_terminal and leaf.rollouts_correct and leaf.depth > prefix.depth:
            path = tree.path(leaf)  # path[i] is at depth i + 1
            if prefix.depth == 0 or path[prefix.depth - 1].node_id == prefix.node_id:
                out.append([n.step_text for n in path[prefix.depth:]])
    return sorted(out)
