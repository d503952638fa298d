"""Lean-verified step-DPO pairs: sibling steps from one prefix, one on which Lean's whole-proof check puts
the proof's first error, and one that continues to a proof Lean verifies.

Works on what the formal labeller (`tasks/formal.py`, the build's `formal` section) found for a problem's
solutions: for each solution with a located first error at step e, prefix = its steps before e, rejected =
step e (a tactic that errors, in the formal domain; a step whose formalisation errors, for the synthetic
problems). The chosen step is the first step of a continuation of the same prefix that ends in a verified
proof, taken from, in this order: solutions of the tree through a sibling that Lean already verified
whole, then the prefix's own stored rollouts (re-read through the engine: a memo hit, no new sampling),
checked whole with Lean as prefix + continuation (at most `max_candidates` per pair, in one batch per
problem). Values are Lean's evidence, not Monte Carlo's: chosen 1.0 (verified), rejected 0.0 (errors).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from tasks.formal import FormalCheck, FormalLabeller
from tasks.labels import solution_id
from tasks.pairs.common import pair_row
from tasks.search.engine import Engine
from tasks.search.tree import Node, Tree
from verifiers.base import Status

KIND = "formal"


class FormalPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Write Lean-verified sibling pairs (kind `formal`): the step at Lean's "
                          "first error against a sibling step that leads to a proof Lean verifies. Needs the "
                          "`formal` section on.")
    max_per_prefix: int = Field(1, ge=1, description="Distinct chosen steps per (prefix, rejected step).")
    max_candidates: int = Field(8, ge=1, description="Continuations of a prefix (stored rollouts) checked with Lean "
                                "per pair to find a verified one; tree solutions Lean already verified cost nothing.")


def candidates(continuations: Iterable[list[str]], rejected: str, limit: int) -> list[list[str]]:
    """The first `limit` continuations worth checking with Lean: not empty, and not starting with the rejected
    step itself. The filter comes before the count, so rollouts that repeat the rejected step (common: the
    policy made that mistake once, it makes it again) never use up the places of real siblings."""
    return [steps for steps in continuations if steps and steps[0] != rejected][:limit]


async def make_pairs(engine: Engine, tree: Tree, leaves: Iterable[Node], checks: Mapping[str, FormalCheck],
                     labeller: FormalLabeller, cfg: FormalPairsConfig) -> list[dict[str, Any]]:
    problem = tree.problem
    paths = {solution_id(problem.problem_id, leaf.node_id): tree.path(leaf)
             for leaf in {leaf.node_id: leaf for leaf in leaves}.values()}
    verified = [paths[sid] for sid in sorted(checks) if sid in paths and checks[sid].status is Status.VALID]
    # (prefix node, rejected node, full rejected steps, continuations: (steps, verified or None = to check))
    wanted: list[tuple[Node, Node, list[str], list[tuple[list[str], bool | None]]]] = []
    seen: set[tuple[str, str]] = set()
    for sid in sorted(checks):
        e = checks[sid].first_error
        if e is None or sid not in paths:
            continue
        path = paths[sid]
        prefix, rejected = (path[e - 1] if e > 0 else tree.root), path[e]
        if (prefix.node_id, rejected.step_text) in seen:
            continue  # several solutions sharing one first error give one pair
        seen.add((prefix.node_id, rejected.step_text))
        found: list[tuple[list[str], bool | None]] = []
        for other in verified:
            if len(other) > e and (e == 0 or other[e - 1].node_id == prefix.node_id):
                found.append(([n.step_text for n in other[e:]], True))
        continuations: list[list[str]] = []
        for purpose, n in list(prefix.estimates):
            stats = await engine.rollouts(problem, tree.prefix(prefix), n, purpose=purpose)
            continuations += [[s.text for s in engine.segments(comp)] for comp in stats.completions]
        found = [(steps, ok) for steps, ok in found if steps[0] != rejected.step_text]
        found += [(steps, None) for steps in candidates(continuations, rejected.step_text, cfg.max_candidates)]
        if found:
            wanted.append((prefix, rejected, [n.step_text for n in path[e:]], found))
    to_check = [tree.steps(prefix) + steps for prefix, _, _, found in wanted for steps, ok in found if ok is None]
    outcomes = iter(await labeller.check_solutions(problem, to_check) or []) if to_check else iter(())
    rows: list[dict[str, Any]] = []
    for prefix, rejected, full_rejected, found in wanted:
        chosen_seen: set[str] = set()
        for steps, ok in found:
            if ok is None:
                ok = next(outcomes).status is Status.VALID
            if not ok or steps[0] in chosen_seen or len(chosen_seen) >= cfg.max_per_prefix:
                continue
            chosen_seen.add(steps[0])
            rows.append(pair_row(engine, tree, prefix, steps[0], rejected.step_text, kind=KIND, chosen_value=1.0,
                                 rejected_value=0.0, full_chosen=steps, full_rejected=full_rejected,
                                 id_prefix=f"{prefix.node_id}:{KIND}"))
    return rows
