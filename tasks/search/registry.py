"""Config name -> algorithm. Each algorithm module exposes `run_problem(engine, problem, cfg)`
returning the tree and the leaves of the solution paths its labeller should write."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from tasks.search import math_shepherd

RunProblem = Callable[..., Awaitable[Any]]

ALGORITHMS: dict[str, RunProblem] = {
    math_shepherd.ALGORITHM: math_shepherd.run_problem,
}
