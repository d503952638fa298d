"""MCTS over steps (the AlphaMath / rStar-Math / MCTS-DPO family).

One iteration: descend from the root by UCT or PUCT to a leaf; expand it with `children` one-step
samples (one request, n = children); evaluate every new child (a finished solution by the outcome
verifier, reward +1 / -1; an unfinished step by k rollouts, reward = mean of +1 / -1 over them); back the
reward up the path with a mean backup (visits += 1, value_sum += reward on every node). Q(s, a) =
value_sum / visits. The node also keeps its raw rollout evidence (k, c), so MC labels, advantages and
pairs can be read from the same tree.

UCT:  a* = argmax Q(a) + c * sqrt(ln N(s) / N(a))            (unvisited children first)
PUCT: a* = argmax Q(a) + c * P(a) * sqrt(N(s)) / (1 + N(a))   P = exp(mean token logprob), normalised over
      siblings where the backend gives log-probs, uniform otherwise.

ReST-MCTS* value targets (Zhang et al., 2024) are an option for the `q_value` column of `steps`:
v_k = max(v_{k-1} + (1 - v_{k-1}) / (m_k + 1) * (1 - 2 r_k), 0) with m_k the steps left on the path and
r_k = 0 if some rollout from step k or from a longer prefix below it reached the answer, else 1 (the notion
of `tree.reaches_answer`, so the targets agree with `first_error_index`).
"""

from __future__ import annotations

import asyncio
import math
from typing import Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem
from tasks.search.engine import Engine, is_final_step
from tasks.search.evaluate import estimate, mark_terminal
from tasks.search.tree import Node, SearchResult, Tree, first_error_index

ALGORITHM = "mcts"


class MCTSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["mcts"] = "mcts"
    selection: Literal["puct", "uct"] = Field("puct", description="Child selection rule.")
    c: float = Field(1.0, ge=0.0, description="Exploration constant of UCT / PUCT.")
    children: int = Field(4, ge=1, description="One-step samples per expansion (equal steps merge into one child).")
    iterations: int = Field(32, ge=1, description="Select-expand-evaluate-backup iterations per problem.")
    max_depth: int = Field(12, ge=1, description="Steps below the root after which a node is not expanded.")
    k: int = Field(4, ge=1, description="Rollouts evaluating a new unfinished node (its stored MC evidence).")
    parallel_iterations: int = Field(
        1, ge=1, description="Selections made per tree before any of them is evaluated (a wave). Each selected path "
        "carries a virtual loss (one visit with reward -1 per pending selection) so the next selection of the wave "
        "prefers other branches; the wave's expansions and evaluations then run concurrently and are backed up in "
        "selection order, so the search stays deterministic. 1 = plain sequential MCTS (the default; existing "
        "data unchanged). Larger values keep more requests in flight per tree at some cost in search quality.")
    value_target: Literal["mean", "rest"] = Field(
        "mean", description="`q_value` of the steps table: `mean` = the backed-up Q; `rest` = ReST-MCTS* targets.")


def own_value(node: Node) -> float:
    """The node's evaluation as a reward in [-1, 1]: (2c - k) / k of its own rollouts (a finished solution
    is one rollout of itself: +1 or -1); 0 when nothing was decided."""
    k, c = node.rollouts, node.rollouts_correct
    return (2 * c - k) / k if k else 0.0


def priors(children: Sequence[Node]) -> list[float]:
    lps = [ch.prior_logprob for ch in children]
    if not children:
        return []
    if any(lp is None for lp in lps):
        return [1.0 / len(children)] * len(children)
    ps = [math.exp(lp) for lp in lps]  # type: ignore[arg-type]
    total = sum(ps)
    return [p / total for p in ps] if total > 0 else [1.0 / len(children)] * len(children)


def _visits_q(node: Node, vloss: int) -> tuple[int, float]:
    # Virtual loss: `vloss` pending selections count as visits with reward -1 each. Without any, the node's
    # own numbers are used untouched (bit-for-bit the sequential search).
    if not vloss:
        return node.visits, node.q
    visits = node.visits + vloss
    return visits, (node.value_sum - vloss) / visits


def uct(parent_visits: int, child: Node, c: float, vloss: int = 0) -> float:
    visits, q = _visits_q(child, vloss)
    if visits == 0:
        return math.inf
    return q + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


def puct(parent_visits: int, child: Node, prior: float, c: float, vloss: int = 0) -> float:
    visits, q = _visits_q(child, vloss)
    return q + c * prior * math.sqrt(parent_visits) / (1 + visits)


def select_child(parent: Node, children: Sequence[Node], rule: str, c: float,
                 vloss: Mapping[str, int] | None = None) -> Node:
    """The child the rule picks; the first (insertion order) wins ties. `vloss`: pending selections per node
    id (virtual loss of a parallel wave)."""
    vl = vloss or {}
    n_parent = parent.visits + vl.get(parent.node_id, 0)
    if rule == "uct":
        scores = [uct(n_parent, ch, c, vl.get(ch.node_id, 0)) for ch in children]
    else:
        scores = [puct(n_parent, ch, p, c, vl.get(ch.node_id, 0)) for ch, p in zip(children, priors(children))]
    return children[max(range(len(children)), key=lambda i: (scores[i], -i))]


def backup(path: Sequence[Node], reward: float) -> None:
    """Mean backup: every node on the path (root included) gets one visit and the reward."""
    for node in path:
        node.visits += 1
        node.value_sum += reward


def rest_value_targets(step_ok: Sequence[bool]) -> list[float]:
    """ReST-MCTS* value targets of a path's steps, from whether each step can still reach the answer."""
    out: list[float] = []
    v = 0.0
    n = len(step_ok)
    for i, ok in enumerate(step_ok):
        m = n - (i + 1)  # steps left after this one
        v = max(v + (1.0 - v) / (m + 1) * (1.0 if ok else -1.0), 0.0)
        out.append(v)
    return out


def q_values(cfg: MCTSConfig, path: Sequence[Node], reach: Mapping[str, bool | None]) -> list[float | None] | None:
    """The `q_value` column for a labelled path, or None for the labeller's default (the backed-up Q).

    `reach` is `tree.reaches_answer(tree)`: a step "can still reach the answer" when a rollout of its own
    prefix or of any longer prefix below it did, exactly the notion behind `first_error_index`, so the
    ReST targets rise up to the first error and fall from it. (A node's own k rollouts alone would call a
    right step wrong whenever its few rollouts all failed but a continuation below it succeeded.)"""
    if cfg.value_target != "rest":
        return None
    # Good iff before the first error (steps without evidence are not errors there either), the rule
    # `labels.step_rows` writes as `first_error_index`.
    first_error = first_error_index(path, reach)
    if first_error is None:
        first_error = len(path)
    return rest_value_targets([i < first_error for i in range(len(path))])


async def _evaluate(engine: Engine, tree: Tree, node: Node, final: bool, k: int) -> None:
    if final:
        await mark_terminal(engine, tree, node)
    else:
        await estimate(engine, tree, node, k)


def budget_rollouts(cfg: MCTSConfig) -> float:
    """Most rollouts one problem can request at scale 1: each iteration expands one leaf (`children` samples)
    and evaluates up to `children` new nodes with k rollouts each. (The cap, not the typical spend: merged
    children and re-visited finished nodes cost nothing.)"""
    return float(cfg.iterations * cfg.children * (1 + cfg.k))


def _descend(tree: Tree, expanded: set[str], cfg: MCTSConfig, vloss: Mapping[str, int],
             claimed: set[str]) -> list[Node] | None:
    """The selected path, never through a leaf this wave already claimed for expansion (it would only be
    expanded twice); None when every way down is claimed. With nothing claimed: plain selection."""
    node, path = tree.root, [tree.root]
    while node.node_id in expanded and node.children and not node.is_terminal:
        kids = [ch for ch in tree.children(node) if ch.node_id not in claimed]
        if not kids:
            return None
        node = select_child(node, kids, cfg.selection, cfg.c, vloss)
        path.append(node)
    return None if node.node_id in claimed else path


async def run_problem(engine: Engine, problem: Problem, cfg: MCTSConfig, *, tree: Tree | None = None,
                      scale: float = 1.0) -> SearchResult:
    tree = tree or Tree(problem, ALGORITHM, engine.policy.policy_id)
    iterations = max(1, round(cfg.iterations * scale))
    expanded: set[str] = set()
    rollouts = 0
    it = 0
    while it < iterations:
        # Selection phase of a wave: up to `parallel_iterations` paths, each adding a virtual loss to its
        # nodes; leaves claimed for expansion by this wave are skipped by later selections (expanding one
        # twice would only repeat its request). The wave ends early when every way down is claimed; the
        # first selection always proceeds and is exactly the sequential search's.
        vloss: dict[str, int] = {}
        picks: list[tuple[int, list[Node], bool]] = []  # (iteration, path, expand it?)
        claimed: set[str] = set()
        while len(picks) < min(cfg.parallel_iterations, iterations - it):
            path = _descend(tree, expanded, cfg, vloss, claimed)
            if path is None:
                break
            node = path[-1]
            expand = not (node.is_terminal or node.depth >= cfg.max_depth or node.node_id in expanded)
            if expand:
                claimed.add(node.node_id)
            picks.append((it + len(picks), path, expand))
            for n in path:
                vloss[n.node_id] = vloss.get(n.node_id, 0) + 1
        it += len(picks)
        expanded |= claimed
        # Expansion: one request per claimed leaf, all in flight at once; children are created in selection
        # order afterwards, so the tree does not depend on which answer lands first.
        to_expand = [(i, path) for i, path, exp in picks if exp]
        comps_of = await asyncio.gather(*(engine.expand(problem, tree.prefix(path[-1]), cfg.children)
                                          for _, path in to_expand))
        rollouts += cfg.children * len(to_expand)
        new_of: dict[int, list[tuple[Node, bool]]] = {}
        finished: list[Node] = []  # leaves the policy could not continue: judged as they are
        for (i, path), comps in zip(to_expand, comps_of):
            node = path[-1]
            new: list[tuple[Node, bool]] = []
            for comp in comps:
                segs = engine.segments(comp)
                if not segs:
                    continue
                before = len(tree.nodes)
                child = tree.child(node, segs[0], round=i, prior_logprob=comp.mean_logprob)
                if len(tree.nodes) > before:
                    new.append((child, is_final_step(child.step_text, comp)))
            new_of[i] = new
            if not new and not node.children:
                finished.append(node)
        # Evaluation: every new child of the wave (and every finished leaf) concurrently.
        await asyncio.gather(*(mark_terminal(engine, tree, n) for n in finished),
                             *(_evaluate(engine, tree, ch, final, cfg.k) for new in new_of.values()
                               for ch, final in new))
        rollouts += sum(cfg.k for new in new_of.values() for _, final in new if not final)
        # Backup in selection order (the virtual losses are simply dropped: they were never written).
        done = {n.node_id for n in finished}
        for i, path, exp in picks:
            node = path[-1]
            if not exp or node.node_id in done:
                backup(path, own_value(node))  # nothing to expand: re-use its own evaluation
                continue
            for child, _ in new_of[i]:
                backup([*path, child], own_value(child))
    leaves = [n for n in tree if n.is_terminal and n is not tree.root]
    return SearchResult(tree, leaves, {"iterations": iterations, "search_rollouts": rollouts})
