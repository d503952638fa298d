"""The tree store every search algorithm writes: nodes with raw rollout statistics and verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from storage.render import Segment
from storage.schema import node_id as make_node_id
from tasks.problem import Problem


@dataclass
class Node:
    node_id: str
    problem_id: str
    parent_id: str | None
    depth: int
    step_text: str
    is_terminal: bool = False
    final_answer: str | None = None
    rollouts: int = 0  # k: rollouts with a decided verdict
    rollouts_correct: int = 0  # c
    visits: int = 0
    value_sum: float = 0.0
    prior_logprob: float | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    round: int = 0
    children: list[str] = field(default_factory=list)
    # (purpose, n) of every rollout request behind `rollouts`: lets a pair maker re-read those very rollouts
    # (a memo/cache hit) instead of sampling new ones. Not a column: the evidence is (k, c).
    estimates: list[tuple[str, int]] = field(default_factory=list, repr=False)
    # The step exactly as the policy wrote it (its own label and the separator after it included), so prompts
    # continuing this node are the policy's own text; None when unknown (a step given as plain text), then it is
    # rendered with the step format. Equal steps merge into one node, which keeps the first writing. Not a column.
    generated: str | None = field(default=None, repr=False)

    @property
    def mc(self) -> float | None:
        """MC(s) = c / k, or None before any decided rollout."""
        return self.rollouts_correct / self.rollouts if self.rollouts else None

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def add_rollouts(self, k: int, c: int) -> None:
        self.rollouts += k
        self.rollouts_correct += c


class Tree:
    """One problem's search tree. Node IDs are content hashes, so equal prefixes are one node."""

    def __init__(self, problem: Problem, algorithm: str, policy_id: str) -> None:
        self.problem = problem
        self.algorithm = algorithm
        self.policy_id = policy_id
        root_id = make_node_id(problem.problem_id, "")
        self.root = Node(root_id, problem.problem_id, None, 0, "")
        self.nodes: dict[str, Node] = {root_id: self.root}
        # Each node's prefix, built from its parent's: a node's path never changes (ids are content hashes and
        # a node keeps its first writing), and prompts read a node's prefix for every request from it.
        self._prefixes: dict[str, Prefix] = {root_id: Prefix((), ())}

    def child(self, parent: Node, step: str | Segment, *, round: int = 0, prior_logprob: float | None = None) -> Node:
        """The child of `parent` with this step, created if new. A `Segment` of a completion also gives the
        text the policy wrote for the step (see `Node.generated`)."""
        step_text, generated = (step.text, step.generated) if isinstance(step, Segment) else (step, None)
        nid = make_node_id(parent.node_id, step_text)
        node = self.nodes.get(nid)
        if node is None:
            node = Node(nid, parent.problem_id, parent.node_id, parent.depth + 1, step_text,
                        prior_logprob=prior_logprob, round=round, generated=generated)
            self.nodes[nid] = node
            parent.children.append(nid)
        return node

    def add_path(self, steps: Sequence[str | Segment], *, round: int = 0) -> list[Node]:
        """Insert a sequence of steps under the root; returns the nodes of the path (root excluded)."""
        return self.extend(self.root, steps, round=round)

    def extend(self, start: Node, steps: Sequence[str | Segment], *, round: int = 0) -> list[Node]:
        """Insert a sequence of steps under `start`; returns the new path's nodes (`start` excluded)."""
        node, path = start, []
        for step in steps:
            node = self.child(node, step, round=round)
            path.append(node)
        return path

    def parent(self, node: Node) -> Node | None:
        return self.nodes.get(node.parent_id) if node.parent_id else None

    def path(self, node: Node) -> list[Node]:
        out: list[Node] = []
        while node.parent_id is not None:
            out.append(node)
            node = self.nodes[node.parent_id]
        return out[::-1]

    def steps(self, node: Node) -> list[str]:
        return [n.step_text for n in self.path(node)]

    def prefix(self, node: Node) -> "Prefix":
        """What a prompt continuing `node` holds: its steps as stored and as the policy wrote them."""
        got = self._prefixes.get(node.node_id)
        if got is None:
            up = self.prefix(self.nodes[node.parent_id]) if node.parent_id is not None else Prefix((), ())
            got = self._prefixes[node.node_id] = Prefix((*up.steps, node.step_text), (*up.written, node.generated))
        return got

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[c] for c in node.children]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "node_id": n.node_id, "problem_id": n.problem_id, "parent_id": n.parent_id, "depth": n.depth,
                "step_text": n.step_text, "is_terminal": n.is_terminal, "final_answer": n.final_answer,
                "rollouts": n.rollouts, "rollouts_correct": n.rollouts_correct, "visits": n.visits,
                "value_sum": n.value_sum, "prior_logprob": n.prior_logprob, "verdicts": n.verdicts,
                "algorithm": self.algorithm, "policy": self.policy_id, "round": n.round,
            }
            for n in self.nodes.values()
        ]


@dataclass(frozen=True)
class Prefix:
    """The steps of a node's prefix: as stored (`steps`) and as the policy wrote them (`written`, None where
    unknown). The engine renders prompts from `written`, so the policy reads back exactly its own text."""

    steps: tuple[str, ...]
    written: tuple[str | None, ...]


def reaches_answer(tree: Tree) -> dict[str, bool | None]:
    """Per node: did any rollout from its prefix reach the answer? Rollouts of a descendant continue this
    prefix too, so they count: True if the node or any descendant has c > 0, False if there is evidence
    (k > 0 somewhere in the subtree) and none is correct, None without evidence."""
    out: dict[str, bool | None] = {}

    def visit(node: Node) -> bool | None:
        # Iterative post-order would avoid recursion, but trees are at most a few dozen steps deep.
        result: bool | None = (node.rollouts_correct > 0) if node.rollouts else None
        for child in tree.children(node):
            r = visit(child)
            if r:
                result = True
            elif r is False and result is None:
                result = False
        out[node.node_id] = result
        return result

    visit(tree.root)
    return out


def first_error_index(path: Sequence[Node], reach: Mapping[str, bool | None]) -> int | None:
    """The one first-error rule (steps table, first-error pairs, ReST value targets): the first step of
    `path` from which no rollout reached the answer, counting rollouts from the step's own prefix and from
    every longer prefix below it (`reach` = `reaches_answer(tree)`); None when there is no such step."""
    return next((i for i, n in enumerate(path) if reach.get(n.node_id) is False), None)


@dataclass
class SearchResult:
    """What an algorithm hands back for one problem: its tree and the leaves of the solution paths the
    labeller writes to `steps` (a leaf may end before the solution does, e.g. at OmegaPRM's first error)."""

    tree: Tree
    leaves: list[Node]
    info: dict[str, int] = field(default_factory=dict)
