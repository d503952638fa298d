"""The HTTP backend rides out short outages: a burst of concurrent connection errors is one failure
episode, not N; a server that disappears for ~5 s mid-build and comes back gives the reference labels; one
that stays down ends the build with one line after `policy.max_outage_s`, one warning per replica state
change and no asyncio shutdown noise."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
import warnings

import httpx
import pytest
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
from tasks.testing.standin_server import StandinServer, StandinServerConfig

MODEL = "simulated-arith"
_LOGGER = "tasks.policy.openai_compat"


def _answer() -> dict:
    return {"choices": [{"index": 0, "text": "Step 1: 1 + 1 = 2.", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def test_a_burst_of_concurrent_connection_errors_is_one_failure_episode(caplog):
    """8 requests refused in the same instant (a restarting server) count once: with a threshold of 2 the
    breaker stays closed and every request succeeds on its retry (counting 8 would open it at once and,
    with max_outage_s=0, fail them)."""
    arrived: list[asyncio.Future] = []
    state = {"refusing": True}

    async def server(request: httpx.Request) -> httpx.Response:
        if state["refusing"]:
            gate = asyncio.get_running_loop().create_future()
            arrived.append(gate)
            if len(arrived) == 8:  # all 8 are in flight: refuse them together, then come back
                state["refusing"] = False
                for g in arrived:
                    g.set_result(None)
            await gate
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=_answer())

    policy = OpenAIPolicy(OpenAIPolicyConfig(base_url="http://replica.test/v1", model=MODEL, breaker_threshold=2,
                                             max_outage_s=0, backoff_initial_s=0.001, backoff_max_s=0.002),
                          transport=httpx.MockTransport(server))
    caplog.set_level(logging.WARNING, logger=_LOGGER)

    async def run():
        try:
            return await policy.generate([GenerationRequest(f"Q{i}", SamplingParams()) for i in range(8)])
        finally:
            await policy.aclose()

    results = asyncio.run(run())
    assert len(results) == 8 and policy.usage.retries == 8 and policy.usage.failures == 0
    replica = policy._replicas[0]
    assert replica.open_until == 0.0 and replica.consecutive_failures == 0
    assert not [r for r in caplog.records if r.name == _LOGGER], "the breaker never opened"


class _Outage:
    """A stand-in server that dies after `after` requests and, when `down_s` is set, comes back on the same
    port that many seconds later (a restart)."""

    def __init__(self, after: int, down_s: float | None) -> None:
        self.first = StandinServer(StandinServerConfig(model=MODEL, die_after=after))
        self.url = self.first.start()
        self.down_s = down_s
        self.second: StandinServer | None = None
        self.died_at: float | None = None
        self.back_at: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.first.dead and not self._done.is_set():
            time.sleep(0.01)
        self.died_at = time.monotonic()
        if self.down_s is None or self._done.wait(self.down_s):
            return
        self.second = StandinServer(StandinServerConfig(model=MODEL), port=self.first.port)
        self.second.start()
        self.back_at = time.monotonic()

    def close(self) -> None:
        self._done.set()
        self.first.stop()
        if self.second is not None:
            self.second.stop()


def _policy(url: str, **changes) -> dict:
    return {"kind": "openai", "base_url": url, "model": MODEL, "timeout_s": 2.0, "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5, "breaker_cooldown_s": 0.5, **changes}


def _cfg(small_config, url: str, **policy):
    return small_config(source={"kind": "synthetic", "num_problems": 16, "seed": 5},
                        search={"num_solutions": 2, "k": 4}, rollout_cache=False, concurrency={"shards": 2},
                        policy=_policy(url, **policy))


def _state_changes(caplog, url: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _LOGGER and url in r.getMessage()]


@pytest.mark.usefixtures("prefect_server")
def test_a_server_gone_for_5_s_mid_build_gives_the_reference_labels(small_config, caplog):
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        reference = build_dataset(_cfg(small_config, srv.base_url))
    caplog.set_level(logging.WARNING, logger=_LOGGER)
    outage = _Outage(after=reference["usage"]["requests"] // 3, down_s=5.0)
    try:
        t0 = time.monotonic()
        summary = build_dataset(_cfg(small_config, outage.url, max_outage_s=30))
        elapsed = time.monotonic() - t0
    finally:
        outage.close()
    assert outage.died_at is not None and outage.back_at is not None and elapsed >= 5.0, "the outage happened"
    assert summary["content_hash"] == reference["content_hash"]
    assert summary["usage"]["requests"] == reference["usage"]["requests"] and summary["usage"]["failures"] == 0
    # One warning per state change of the replica, whatever the number of requests and shards.
    changes = _state_changes(caplog, outage.url)
    assert len(changes) == 2 and "unreachable" in changes[0] and "answers again" in changes[1], changes


@pytest.mark.usefixtures("prefect_server")
def test_a_server_that_stays_down_ends_the_build_in_one_line_after_max_outage(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    outage = _Outage(after=20, down_s=None)
    args = ["build", "--set", f"storage.root={tmp_path / 'data'}", "--set", "source.num_problems=16",
            "--set", "search.k=4", "--set", "rollout_cache=false", "--set", "shard_size=8"]
    for key, value in _policy(outage.url, max_outage_s=2).items():
        args += ["--set", f"policy.{key}={value}"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            result = CliRunner().invoke(app, args)
            elapsed = time.monotonic() - t0
            gc.collect()  # an unawaited coroutine warns when it is collected
    finally:
        outage.close()
    assert result.exit_code == 1, result.output
    last = [ln for ln in result.output.splitlines() if ln.strip()][-1]
    url = re.escape(outage.url)
    assert re.fullmatch(
        rf"error: Policy server unreachable for \d+ s, longer than `policy\.max_outage_s` \(2 s\): {url}: \w+: "
        rf".*\. Usage of this shard so far: \d+ requests answered, \d+ retries, \d+ failed\. Check that the "
        rf"server is running and `policy\.base_url` is right \(or raise `policy\.max_outage_s` to wait longer\); "
        rf"rerun the build to resume from the finished shards\.", last), last
    assert "Traceback" not in result.output
    assert elapsed >= 2.0
    assert len(_state_changes(caplog, outage.url)) == 1, "one warning when the replica went down, none per request"
    noise = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    noise += [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not noise, noise
