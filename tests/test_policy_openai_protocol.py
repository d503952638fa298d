"""The OpenAI backend against servers that differ from vLLM (httpx MockTransport, or the stand-in behind a
rewriting transport): credentials kept out of URLs and messages, stop strings when no `stop_reason` comes
back, the half-open circuit breaker's single probe, BOS handling, and the concurrency limit's scope."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest

from flows.config import load_config
from storage.errors import ConfigError, PolicyError
from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig, _Retryable, fleet_slots
from tasks.testing.standin_server import StandinServer, StandinServerConfig
from tasks.prompt import PromptConfig, render_prompt
from tasks.search.engine import is_final_step
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

MODEL = "simulated-arith"
SECRET = "sk-SECRET-0123456789"
URL = "http://replica.test/v1"


def _policy(urls=URL, transport=None, clock=None, **changes) -> OpenAIPolicy:
    # max_outage_s=0: an all-open breaker fails at once (riding out outages: test_policy_outage.py).
    fields = dict(base_url=urls, model=MODEL, timeout_s=2.0, backoff_initial_s=0.001, backoff_max_s=0.002,
                  api_key_env=None, max_outage_s=0)
    fields.update(changes)
    kwargs = {"clock": clock} if clock else {}
    return OpenAIPolicy(OpenAIPolicyConfig(**fields), transport=transport, **kwargs)


def _answer(n: int = 1, text: str = "Step 1: 1 + 1 = 2.", **choice) -> dict:
    return {"choices": [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None, **choice}
                        for i in range(n)], "usage": {"prompt_tokens": 3, "completion_tokens": n}}


async def _generate(policy: OpenAIPolicy, reqs):
    try:
        return await policy.generate(reqs)
    finally:
        await policy.aclose()


def _req(stop=("\n",), n: int = 1, prompt: str = "Q: 1+1?\n") -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(n=n, seed=1, stop=stop))


# -- 1. credentials --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    f"http://user:{SECRET}@host:8000/v1",
    f"https://{SECRET}@host/v1",
    f"https://host/v1?api-key={SECRET}",
    f"https://host/v1?key={SECRET}",
    f"https://host/v1?token={SECRET}",
    f"https://host/v1?x=1&Access_Token={SECRET}",
    f"http://ok:1/v1,http://u:{SECRET}@bad:2/v1",  # every entry is checked, not only the first
])
def test_credentials_in_base_url_are_refused_without_echoing_them(url):
    with pytest.raises(ValueError, match="api_key_env") as info:
        OpenAIPolicyConfig(base_url=url, model="m")
    assert SECRET not in str(info.value)
    # The CLI path (`--set`) reports it as a config error, again without the secret.
    with pytest.raises(ConfigError, match="api_key_env") as info:
        load_config(None, ["policy.kind=openai", f"policy.base_url={url}", "policy.model=m"])
    assert SECRET not in str(info.value)


def test_plain_urls_pass_and_other_query_strings_are_refused():
    assert OpenAIPolicyConfig(base_url="https://host:1/v1/", model="m").base_url == ["https://host:1/v1"]
    with pytest.raises(ValueError, match="query string"):
        OpenAIPolicyConfig(base_url="https://host/v1?api-version=2024-01-01", model="m")


def test_a_key_echoed_by_the_server_is_masked_in_errors_and_logs(monkeypatch, caplog):
    monkeypatch.setenv("STEPFORGE_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    def echo(request: httpx.Request) -> httpx.Response:
        # A server that quotes the credentials it got, as some do in auth and proxy errors.
        auth = request.headers.get("authorization", "")
        seen.append(auth)
        status = 503 if len(seen) == 1 else 400
        return httpx.Response(status, text=f"bad request with Authorization: {auth}")

    pol = _policy(transport=httpx.MockTransport(echo), api_key_env="STEPFORGE_TEST_KEY", breaker_threshold=100)
    with pytest.raises(PolicyError, match="HTTP 400") as info:
        asyncio.run(_generate(pol, [_req()]))
    assert seen == [f"Bearer {SECRET}"] * 2, "the key was sent, and the 503 was retried"
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert SECRET not in caplog.text


# -- 3. stop strings without vLLM's stop_reason ---------------------------------------------------------
@pytest.mark.parametrize("choice,text,stop,want", [
    ({}, "Step 1: 1 + 1 = 2.", ("\n",), "\n"),  # hosted OpenAI: nothing named, stop string not visible
    ({}, "Step 1: 1 + 1 = 2.\n", ("\n",), "\n"),  # visible at the end (include_stop_str_in_output)
    ({}, "Step 1: x.\n\n", ("\n", "\n\n"), "\n\n"),  # the longest visible one
    ({"matched_stop": "\n"}, "Step 1: 1 + 1 = 2.", ("\n",), "\n"),  # SGLang names the string
    ({"matched_stop": 2}, "The answer is 2.", ("\n",), None),  # SGLang: EOS token id
    ({"stop_reason": None}, "The answer is 2.", ("\n",), None),  # vLLM: null means EOS
    ({}, "The answer is 2.", (), None),  # no stop strings asked for: a natural end
])
def test_stop_reason_is_read_or_inferred(choice, text, stop, want):
    pol = _policy()
    [comp] = pol.parse_response(_req(stop=stop), _answer(text=text, **choice))
    assert comp.stop_reason == want and comp.text == text


def test_a_guessed_stop_string_is_never_attached_to_the_text():
    pol = _policy(vllm_extensions=False)
    req = GenerationRequest("Q", SamplingParams(stop=("\n",), include_stop_str_in_output=True))
    assert pol.parse_response(req, _answer(text="a", stop_reason="\n"))[0].text == "a\n"  # named: re-attached
    guessed = pol.parse_response(req, _answer(text="a"))[0]
    assert guessed.text == "a" and guessed.stop_reason == "\n"


class _StripStopReason(httpx.AsyncBaseTransport):
    """Forwards to a real server and deletes `stop_reason` from its answers, like a hosted API."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self._inner.handle_async_request(request)
        data = json.loads(await resp.aread())
        for ch in data.get("choices", []):
            ch.pop("stop_reason", None)
        return httpx.Response(resp.status_code, json=data)

    async def aclose(self) -> None:
        await self._inner.aclose()


def test_one_step_expansions_stay_non_final_without_stop_reason():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=8, seed=5)).problems
    cfg = PromptConfig()
    reqs = [GenerationRequest(render_prompt(cfg, p.question, []), SamplingParams(n=4, seed=i, stop=cfg.stop))
            for i, p in enumerate(problems)]
    with StandinServer(StandinServerConfig(model=MODEL)) as srv:
        vllm_like = asyncio.run(_generate(_policy(srv.base_url), reqs))
        hosted = asyncio.run(_generate(_policy(srv.base_url, transport=_StripStopReason()), reqs))
    final = [[is_final_step(c.text, c) for c in outs] for outs in vllm_like]
    assert [[is_final_step(c.text, c) for c in outs] for outs in hosted] == final
    assert not all(f for row in final for f in row), "some first steps are not final: the tree can grow"


# -- 7. the half-open breaker lets one probe through ----------------------------------------------------
class _Gate:
    """A fake server whose answers the test releases one at a time; counts what reached it."""

    def __init__(self) -> None:
        self.arrived = 0
        self.fail = False
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.arrived += 1
        await self.release.wait()
        if self.fail:
            return httpx.Response(503, text="still down")
        return httpx.Response(200, json=_answer())


async def _settle() -> None:
    for _ in range(50):  # let every runnable coroutine reach its next await
        await asyncio.sleep(0)


@pytest.mark.parametrize("probe_ok", [True, False])
def test_after_the_cooldown_exactly_one_probe_goes_first(probe_ok):
    now = [0.0]
    gate = _Gate()
    pol = _policy(transport=httpx.MockTransport(gate), clock=lambda: now[0], breaker_threshold=1,
                  breaker_cooldown_s=30.0, max_retries=0)

    async def scenario():
        pol._failed(pol._replicas[0], _Retryable("HTTP 503"))  # the circuit is open
        now[0] = 31.0  # ... and its cooldown is over
        gate.fail = not probe_ok
        tasks = [asyncio.ensure_future(pol.generate([_req()])) for _ in range(6)]
        await _settle()
        in_flight_while_probing = gate.arrived
        gate.release.set()
        try:
            return in_flight_while_probing, await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await pol.aclose()

    probing, results = asyncio.run(scenario())
    assert probing == 1, "while the probe is out, the other requests wait"
    if probe_ok:
        assert all(len(r) == 1 for r in results) and gate.arrived == 6
    else:
        assert gate.arrived == 1, "the failed probe re-opened the circuit; nothing else was sent"
        errors = sorted(str(e) for e in results)
        assert sum("failed 1 times" in e for e in errors) == 1  # the probe
        fast = [e for e in errors if "circuit breaker is open" in e]
        assert len(fast) == 5 and all("0 requests answered, 0 retries" in e for e in fast)
        # The usage so far travels in the message (a failed shard records no usage otherwise).
        assert {int(re.search(r"(\d+) failed", e).group(1)) for e in fast} == {1, 2, 3, 4, 5}


# -- 4. BOS: a prompt rendered with its BOS is not given a second one -------------------------------------
def test_add_special_tokens_is_off_for_prompts_that_carry_their_bos():
    pol = _policy()
    chat = PromptConfig(family="chat", chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
                        bos_token="<|begin_of_text|>")
    rendered = GenerationRequest(render_prompt(chat, "1+1?", []), SamplingParams())
    assert rendered.prompt.startswith("<|begin_of_text|>")
    assert pol.build_body(rendered)[1]["add_special_tokens"] is False
    plain = GenerationRequest(render_prompt(PromptConfig(), "1+1?", []), SamplingParams())
    assert "add_special_tokens" not in pol.build_body(plain)[1]  # the server adds the BOS as usual
    assert _policy(add_special_tokens=True).build_body(rendered)[1]["add_special_tokens"] is True
    assert "add_special_tokens" not in _policy(vllm_extensions=False).build_body(rendered)[1]


# -- 5. max_concurrency holds for the whole process: every shard task (thread + event loop) shares it -----
def test_max_concurrency_bounds_all_shard_threads_together():
    import threading
    import time

    lock, active, peak = threading.Lock(), [0], [0]

    async def count(request: httpx.Request) -> httpx.Response:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.01)  # real time, so the other shard threads' requests overlap with this one
        with lock:
            active[0] -= 1
        return httpx.Response(200, json=_answer())

    url = "http://fleet-bound.test/v1"  # a fleet of its own: the slots are per (base URLs, model, limit)
    results: list[int] = []

    def shard() -> None:  # what one shard task does: its own policy object on its own event loop
        pol = _policy(urls=url, transport=httpx.MockTransport(count), max_concurrency=3)
        results.append(len(asyncio.run(_generate(pol, [_req() for _ in range(12)]))))

    threads = [threading.Thread(target=shard) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [12, 12, 12] and time.monotonic() - t0 < 60
    assert peak[0] == 3, f"{peak[0]} requests in flight at once from three shard threads, limit 3"
    slots = fleet_slots(OpenAIPolicyConfig(base_url=url, model=MODEL, max_concurrency=3))
    assert slots._used == 0 and not slots._waiters, "every slot came back"


def test_a_cancelled_waiter_never_leaks_a_fleet_slot():
    from tasks.policy.openai_compat import _FleetSlots

    async def main() -> None:
        slots = _FleetSlots(1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # hands the slot to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs: it must pass the slot back
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        assert slots._used == 0 and not slots._waiters
        await asyncio.wait_for(slots.acquire(), 1)  # the slot is free again

    asyncio.run(main())
