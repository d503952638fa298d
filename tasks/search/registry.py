"""Search algorithms by config name: one typed record per algorithm, the shape of every stepforge registry
(see `storage/exports/__init__.py`).

A new algorithm is one module (a config model whose `algorithm` field is a one-value `Literal`, and
`run_problem`) plus one line in `ALGORITHMS`. The shard runner sees an algorithm only through the
`SearchAlgorithm` protocol; the capabilities it asks about (reward scale, budgeting) live here, so no other
module keeps a list of algorithm names: `flows/config.py` builds its `search` union from `ALGORITHMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

from pydantic import BaseModel

from tasks.problem import Problem
from tasks.search import math_shepherd, mcts, omegaprm
from tasks.search.engine import Engine
from tasks.search.tree import Node, SearchResult, Tree

__all__ = ["ALGORITHMS", "DEFAULT", "TAG", "Algorithm", "SearchAlgorithm", "get_algorithm"]

TAG = "algorithm"  # the discriminator field of every search config
DEFAULT = math_shepherd.ALGORITHM

RunProblem = Callable[..., Awaitable[SearchResult]]
QValues = Callable[[Any, Sequence[Node], Mapping[str, "bool | None"]], "list[float | None] | None"]


class SearchAlgorithm(Protocol):
    """What the shard runner (`tasks/shard.py`) calls on an algorithm."""

    name: str
    config: type[BaseModel]
    rollouts_are_visits: bool
    budget_by_default: bool

    @property
    def reward_scaled(self) -> bool: ...

    def run_problem(self, engine: Engine, problem: Problem, cfg: Any, *, tree: Tree | None = None,
                    scale: float = 1.0) -> Awaitable[SearchResult]: ...

    def budget_rollouts(self, cfg: Any) -> float | None: ...

    def q_values(self, cfg: Any, path: Sequence[Node], reach: Mapping[str, bool | None]) -> list[float | None] | None: ...


@dataclass(frozen=True)
class Algorithm:
    """One search algorithm and the capabilities the engine asks about.

    - `rollouts_are_visits`: a node's visits are its rollouts (Math-Shepherd, OmegaPRM), so its backed-up
      value is c/k in [0, 1]; otherwise visits are backups of rewards in [-1, 1] (MCTS), and the value is
      already on the common reward scale that pair margins are stated on (`reward_scaled`).
    - `budget_by_default`: probe-then-search budgeting is on unless `budget.enabled` says otherwise.
    - `rollouts_per_problem(cfg)`: the most rollouts one problem may spend at scale 1, so budgeting can take the
      probe's cost out of the shard's budget; None: no fixed per-problem budget (Math-Shepherd's cost
      follows solution length).
    - `q_column(cfg, path, reach)`: fills the steps table's `q_value` column its own way (None: the default).
    """

    name: str
    config: type[BaseModel]
    run: RunProblem
    rollouts_are_visits: bool
    budget_by_default: bool = True
    rollouts_per_problem: Callable[[Any], float] | None = None
    q_column: QValues | None = None

    @property
    def reward_scaled(self) -> bool:
        return not self.rollouts_are_visits

    def run_problem(self, engine: Engine, problem: Problem, cfg: Any, *, tree: Tree | None = None,
                    scale: float = 1.0) -> Awaitable[SearchResult]:
        return self.run(engine, problem, cfg, tree=tree, scale=scale)

    def budget_rollouts(self, cfg: Any) -> float | None:
        return self.rollouts_per_problem(cfg) if self.rollouts_per_problem is not None else None

    def q_values(self, cfg: Any, path: Sequence[Node], reach: Mapping[str, bool | None]) -> list[float | None] | None:
        return self.q_column(cfg, path, reach) if self.q_column is not None else None


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(math_shepherd.ALGORITHM, math_shepherd.MathShepherdConfig, math_shepherd.run_problem,
                  rollouts_are_visits=True, budget_by_default=False),
        Algorithm(omegaprm.ALGORITHM, omegaprm.OmegaPRMConfig, omegaprm.run_problem, rollouts_are_visits=True,
                  rollouts_per_problem=omegaprm.budget_rollouts),
        Algorithm(mcts.ALGORITHM, mcts.MCTSConfig, mcts.run_problem, rollouts_are_visits=False,
                  rollouts_per_problem=mcts.budget_rollouts, q_column=mcts.q_values),
    )
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        from storage.errors import ConfigError

        raise ConfigError(f"`search.algorithm` must be one of {sorted(ALGORITHMS)}, got {name!r}.",
                          field="search.algorithm", value=name)
    return ALGORITHMS[name]
