"""The OpenAI-compatible backend against the stand-in server over real HTTP on loopback: equality with the
in-process simulated policy, retries through injected faults, the circuit breaker, replicas, secrets."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Iterator

import pytest

from storage.errors import PolicyError
from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig, _retry_after
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.testing.standin_server import StandinServer, StandinServerConfig
from tasks.prompt import PromptConfig, render_prompt
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

MODEL = "simulated-arith"


def _requests(n_problems: int = 12, family: str = "completion", logprobs: bool = True) -> list[GenerationRequest]:
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n_problems, seed=3)).problems
    cfg = PromptConfig(family=family)
    reqs = []
    for i, p in enumerate(problems):
        steps = [] if i % 2 else ["Wrong: 1 + 1 = 3."]  # some prompts continue a written step
        stop = cfg.stop if i % 3 == 0 else ()
        reqs.append(GenerationRequest(render_prompt(cfg, p.question, steps),
                                      SamplingParams(n=4, seed=100 + i, stop=stop, logprobs=logprobs)))
    return reqs


def _policy(urls, **changes) -> OpenAIPolicy:
    # max_outage_s=0: connection failures count as retries and an all-open breaker fails at once (riding out
    # outages is tested in test_policy_outage.py).
    fields = dict(base_url=urls, model=MODEL, timeout_s=2.0, backoff_initial_s=0.01, backoff_max_s=0.05,
                  api_key_env=None, max_outage_s=0)
    fields.update(changes)
    return OpenAIPolicy(OpenAIPolicyConfig(**fields))


async def _generate(policy: OpenAIPolicy, reqs):
    try:
        return await policy.generate(reqs)
    finally:
        await policy.aclose()


def _content(results):
    # What the engine reads; `cached_tokens` depends on what the server saw before, so it is left out.
    return [[(c.text, c.finish_reason, c.stop_reason, c.mean_logprob, c.token_logprobs) for c in outs]
            for outs in results]


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback base URL where nothing answers: its port stays bound, never listening, for the whole test,
    so connections are refused and no server (nor a client's own source port) can take it meanwhile. A port
    picked by binding and closing was free to be reused by anything, and then the "dead" server answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.fixture
def server():
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        yield srv


@pytest.mark.parametrize("endpoint,family", [("completions", "completion"), ("chat", "chat")])
def test_http_samples_equal_the_in_process_policy(server, endpoint, family):
    reqs = _requests(family=family)
    got = asyncio.run(_generate(_policy(server.base_url, endpoint=endpoint), reqs))
    local = SimulatedPolicy(SimulatedPolicyConfig())
    want = asyncio.run(local.generate(reqs))
    assert _content(got) == _content(want)
    assert all(len(outs) == 4 for outs in got)
    assert server.stats.requests == len(reqs), "n=4 is one request, never four"


def test_stop_strings_end_one_step_and_can_be_kept(server):
    reqs = _requests()
    pol = _policy(server.base_url)
    one = [GenerationRequest(r.prompt, SamplingParams(n=2, seed=r.params.seed, stop=("\n",))) for r in reqs]
    kept = [GenerationRequest(r.prompt, SamplingParams(n=2, seed=r.params.seed, stop=("\n",),
                                                       include_stop_str_in_output=True)) for r in reqs]
    a = asyncio.run(_generate(pol, one))
    b = asyncio.run(_generate(_policy(server.base_url), kept))
    for outs_a, outs_b in zip(a, b):
        for x, y in zip(outs_a, outs_b):
            assert "\n" not in x.text and x.stop_reason == "\n" and y.text == x.text + "\n"


def test_faults_are_retried_to_the_same_results(server):
    reqs = _requests(24)
    clean = asyncio.run(_generate(_policy(server.base_url), reqs))
    # The timeout is generous for a clean answer (~ms) even on a loaded CI box, so only `slow` faults hit it.
    server.set_faults(fault_rate=0.3, slow_s=3.0, retry_after_s=0.01)
    before = server.stats.requests
    pol = _policy(server.base_url, timeout_s=1.0)
    faulty = asyncio.run(_generate(pol, reqs))
    assert _content(faulty) == _content(clean)
    injected = sum(server.stats.faults.values())
    assert set(server.stats.faults) == {"5xx", "429", "slow", "drop"}
    # Every fault costs exactly one retry, and nothing is lost or sent twice.
    assert pol.usage.retries == injected == server.stats.requests - before - len(reqs)
    assert pol.usage.requests == len(reqs) and pol.usage.failures == 0


def test_dead_server_opens_the_breaker_and_fails_clearly(dead_url):
    url = dead_url
    pol = _policy(url, breaker_threshold=3, max_retries=50)
    with pytest.raises(PolicyError, match="circuit breaker is open") as info:
        asyncio.run(_generate(pol, _requests(4)))
    assert url in str(info.value) and "rerun the build to resume" in str(info.value)
    # 4 requests, 3 failure episodes to open it: each episode costs at most one failure per request in flight.
    assert pol.usage.retries <= 4 * 3 + 4, "the breaker stops retries long before max_retries (50 each)"


def test_exhausted_retries_fail_with_the_last_error(server):
    server.set_faults(fault_rate=1.0, fault_kinds=["5xx"])
    pol = _policy(server.base_url, max_retries=2, breaker_threshold=100)
    with pytest.raises(PolicyError, match="failed 3 times; last error: HTTP 503"):
        asyncio.run(_generate(pol, _requests(1)))
    assert pol.usage.retries == 2 and pol.usage.failures == 1


def test_replicas_share_the_load_and_a_dead_one_is_skipped(server, dead_url):
    with StandinServer(StandinServerConfig(model=MODEL)) as other:
        dead = dead_url
        reqs = _requests(24)
        pol = _policy([server.base_url, other.base_url, dead], breaker_threshold=2)
        got = asyncio.run(_generate(pol, reqs))
        assert len(got) == 24 and server.stats.answered > 0 and other.stats.answered > 0
        assert server.stats.answered + other.stats.answered == 24
        assert pol.usage.retries >= 1  # the dead replica's failures were retried elsewhere


def test_api_key_is_sent_but_never_logged_or_reported(monkeypatch, caplog, dead_url):
    secret = "sk-test-5ecret-do-not-log"
    monkeypatch.setenv("STEPFORGE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with StandinServer(StandinServerConfig(model=MODEL, api_key=secret, fault_rate=0.5, fault_kinds=["5xx"])) as srv:
        pol = _policy(srv.base_url, api_key_env="STEPFORGE_TEST_KEY")
        assert len(asyncio.run(_generate(pol, _requests(4)))) == 4  # accepted: the header was sent
        monkeypatch.setenv("STEPFORGE_TEST_KEY", "sk-wrong-" + secret)
        with pytest.raises(PolicyError) as info:
            asyncio.run(_generate(_policy(srv.base_url, api_key_env="STEPFORGE_TEST_KEY"), _requests(1)))
        assert "STEPFORGE_TEST_KEY" in str(info.value) and secret not in str(info.value)
    dead = _policy(dead_url, api_key_env="STEPFORGE_TEST_KEY", breaker_threshold=1)
    with pytest.raises(PolicyError) as info:
        asyncio.run(_generate(dead, _requests(1)))
    assert secret not in str(info.value)
    assert secret not in caplog.text and caplog.records, "the run logged, and never the key"
    assert secret not in pol.config.model_dump_json() and secret not in repr(pol.config)


def test_request_body_carries_vllm_options_and_token_accounting_adds_up():
    pol = _policy("http://127.0.0.1:1/v1", min_p=0.05, top_k=20, skip_special_tokens=False,
                  extra_body={"repetition_penalty": 1.1})
    req = GenerationRequest("Q", SamplingParams(n=3, seed=7, stop=("\n",), logprobs=True,
                                                include_stop_str_in_output=True))
    path, body = pol.build_body(req)
    assert path == "completions"
    assert body == {"model": MODEL, "n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 512, "stop": ["\n"],
                    "seed": 7, "prompt": "Q", "logprobs": 1, "include_stop_str_in_output": True, "min_p": 0.05,
                    "top_k": 20, "skip_special_tokens": False, "repetition_penalty": 1.1}
    hosted = _policy("http://127.0.0.1:1/v1", vllm_extensions=False)
    assert "include_stop_str_in_output" not in hosted.build_body(req)[1]
    data = {"choices": [{"index": i, "text": "ab", "finish_reason": "stop", "stop_reason": "\n",
                         "logprobs": None} for i in (2, 0, 1)],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 8}}}
    outs = hosted.parse_response(req, data)
    assert [o.text for o in outs] == ["ab\n"] * 3  # stop string re-attached client-side
    assert sum(o.completion_tokens for o in outs) == 7 == hosted.usage.completion_tokens
    assert hosted.usage.prompt_tokens == 11 and hosted.usage.cached_tokens == 8 and outs[0].cached_tokens == 8
    with pytest.raises(PolicyError, match="returned 1 choices for n=3"):
        hosted.parse_response(req, {"choices": data["choices"][:1], "usage": {}})


def test_usage_matches_what_the_server_counted(server):
    reqs = _requests(12)
    pol = _policy(server.base_url)
    asyncio.run(_generate(pol, reqs))
    second = [GenerationRequest(r.prompt + "Step 9: x\n", r.params) for r in reqs]  # extends each prompt
    asyncio.run(_generate(pol, second))
    assert pol.usage.requests == 24 and pol.usage.samples == 96
    assert pol.usage.prompt_tokens == server.stats.prompt_tokens
    assert pol.usage.cached_tokens == server.stats.cached_tokens > 0


def test_retry_after_parsing_and_config_checks():
    assert _retry_after("2") == 2.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: go now
    cfg = OpenAIPolicyConfig(base_url="http://a:1/v1/, http://b:2/v1", model="m")
    assert cfg.base_url == ["http://a:1/v1", "http://b:2/v1"]
    with pytest.raises(ValueError, match="must start with http"):
        OpenAIPolicyConfig(base_url="a:1", model="m")


def test_serve_policy_command_serves_with_faults():
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import app; app()", "serve-policy", "--port", "0",
                             "--fault-rate", "0.5", "--faults", "429,drop", "--latency", "0.01"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://\S+/v1)", line).group(1)
        assert "--set policy.kind=openai" in line
        pol = _policy(url)
        got = asyncio.run(_generate(pol, _requests(4)))
        assert len(got) == 4 and pol.usage.retries >= 2  # half the requests were refused, then retried
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_policy_separator_and_die_after():
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import app; app()", "serve-policy", "--port", "0",
                             "--separator", "\\n\\n", "--die-after", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://\S+/v1)", line).group(1)
        assert """--set 'prompt.step_format.separator="\\n\\n"'""" in line  # the build must split alike
        problem = load_synthetic(SyntheticSourceConfig(num_problems=1, seed=3)).problems[0]
        question = render_prompt(PromptConfig(step_format={"separator": "\n\n"}), problem.question, [])
        pol = _policy(url, max_retries=0, breaker_threshold=1)
        whole = asyncio.run(_generate(pol, [GenerationRequest(question, SamplingParams(n=1, seed=1))]))[0][0]
        assert "\n\n" in whole.text, "steps are written with the given separator"
        one = asyncio.run(_generate(_policy(url), [GenerationRequest(question, SamplingParams(stop=("\n\n",)))]))
        assert one[0][0].stop_reason == "\n\n"
        with pytest.raises(PolicyError):  # the third request finds the server gone
            asyncio.run(_generate(_policy(url, max_retries=0), [GenerationRequest(question, SamplingParams())]))
    finally:
        proc.terminate()
        proc.wait(10)
