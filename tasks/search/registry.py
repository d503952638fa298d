"""Config name -> algorithm. Each algorithm module exposes `ALGORITHM`, its config model and
`run_problem(engine, problem, cfg, *, tree=None, scale=1.0) -> SearchResult`; optionally
`q_values(cfg, path, reach)` to fill the steps table's `q_value` column its own way, and
`budget_rollouts(cfg)` (default rollouts per problem) so budgeting can take the probe's cost out of the shard's
budget."""

from __future__ import annotations

from types import ModuleType

from tasks.search import math_shepherd, mcts, omegaprm

ALGORITHMS: dict[str, ModuleType] = {m.ALGORITHM: m for m in (math_shepherd, omegaprm, mcts)}
