"""Shared fixtures: one real Prefect server per test session, small build configs, real data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


_ARROW_POOLS: list = []  # every proxy pool made by `arrow_proxy_pool`, kept until the interpreter exits


def arrow_proxy_pool():
    """A proxy of Arrow's default pool, to set as the default while measuring a peak (`max_memory()`).

    Kept alive for the whole session: a buffer allocated through a proxy frees itself through it, and some
    outlive the measurement (tables a `ReleaseData` caches: up to 311 KB were still allocated when
    `test_pair_exports_memory_does_not_grow_with_the_release` returned). A proxy freed with its Python object
    turned their release into a use-after-free: a segfault at random, which ends the whole run (the same calls
    outside pytest crashed 3 times in 3). A proxy holds no memory of its own, so keeping them costs nothing."""
    import pyarrow as pa

    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    _ARROW_POOLS.append(pool)
    return pool


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (SQLite, loopback) for the whole session; flows run against it.

    Waits at least 300 s for it to start, longer when `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`
    asks for more. Prefect's default (20 s) and the 60 s used here before are too short on a loaded 2-core
    machine: at load 6-8 the start took 61 s, and a 60 s limit failed after 84 s of wall time (Prefect counts
    only its polling sleeps). A long limit costs nothing when the server comes up; a broken one fails later."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    from prefect.testing.utilities import prefect_test_harness

    timeout = max(300, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with prefect_test_harness(server_startup_timeout=timeout):
        yield


@pytest.fixture(autouse=True)
def _no_events_socket_under_hypothesis(request):
    """Close Prefect's events connection before a Hypothesis test.

    A flow run earlier in the session leaves Prefect's events client connected (its websocket lives on in
    Prefect's `GlobalEventLoopThread`), and websockets draws each keepalive ping's payload from the global
    `random` module. Hypothesis compares that module's state around every draw; a ping landing mid-draw
    reads as a strategy using `random` (HypothesisDeprecationWarning "Do not use the `random` module inside
    strategies", seen in tests/test_export_stream.py under the full suite). The next flow reconnects."""
    if request.node.get_closest_marker("hypothesis") is not None and "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30, at_exit=False)
    yield


@pytest.fixture
def small_config(tmp_path):
    """A fast synthetic build writing under tmp_path; override fields with `small_config(**changes)`."""
    from flows.config import BuildConfig

    def make(**changes):
        data = {
            "dataset": "demo",
            "source": {"kind": "synthetic", "num_problems": 24, "seed": 0},
            "search": {"algorithm": "math-shepherd", "num_solutions": 2, "k": 8},
            "storage": {"root": str(tmp_path / "data")},
            "shard_size": 8,
        }
        for key, value in changes.items():
            base = data.get(key)
            same_kind = isinstance(base, dict) and isinstance(value, dict) and all(
                value.get(tag, base.get(tag)) == base.get(tag) for tag in ("kind", "algorithm"))
            if same_kind:  # a change of kind/algorithm replaces the section instead of merging into it
                data[key] = {**base, **value}
            else:
                data[key] = value
        return BuildConfig.model_validate(data)

    return make


@pytest.fixture(scope="module")
def make_engine():
    """`make_engine(rate=0.3, *, seed=0, cache=None, policy=None, prompt=None)`: an `Engine` over the simulated
    policy (or `policy`) and the outcome verifier, the set-up every engine-level test shares. Verifier pools
    are closed when the module's tests are done (module scope, so module-scoped fixtures can use it too)."""
    import asyncio

    from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
    from tasks.prompt import PromptConfig
    from tasks.search.engine import Engine
    from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig

    engines = []

    def make(rate: float = 0.3, *, seed: int = 0, cache=None, policy=None, prompt=None):
        prompt = prompt or PromptConfig()
        policy = policy or SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=rate), prompt.step_format)
        engine = Engine(policy, OutcomeVerifier(OutcomeVerifierConfig()), prompt, seed=seed, cache=cache)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.verifier.aclose())
