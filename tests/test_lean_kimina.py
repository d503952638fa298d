"""The Kimina client against the Kimina stand-in over real HTTP: results, header offsets in both server
generations, timeouts, retries of 429/500/499, auth, the circuit breaker, header reuse."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from storage.errors import ConfigError
from verifiers.base import Status
from verifiers.lean.base import LeanItem
from verifiers.lean.kimina import KiminaConfig, KiminaVerifier, kimina_header_lines
from verifiers.lean.testing.kimina_server import KiminaStandin, KiminaStandinConfig, split_header

HEADER = "import Mathlib\n\nset_option maxHeartbeats 400000\n\nopen BigOperators Real Nat Topology Rat"
KEY_ENV = "STEPFORGE_TEST_KIMINA_KEY"


def items() -> list[LeanItem]:
    return [
        LeanItem("theorem a : (2 : ℚ) + 2 = 4 := by\n  norm_num", HEADER),
        LeanItem("theorem b : (2 : ℚ) + 2 = 4 := by\n  have h : (2 : ℚ) * 3 = 7 := by norm_num\n  linarith", HEADER),
        LeanItem("theorem c : (2 : ℚ) + 2 = 4 := by\n  sorry", HEADER),
        LeanItem("theorem d : (2 : ℚ) + 2 = 4 := by\n  nlinarith", HEADER),
    ]


def client(url: str, **kw) -> KiminaVerifier:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return KiminaVerifier(KiminaConfig(base_url=url, **kw))


@pytest.mark.parametrize("shift", [True, False])
def test_results_and_positions_are_relative_to_the_body_in_both_server_generations(shift: bool) -> None:
    with KiminaStandin(KiminaStandinConfig(shift_header_lines=shift)) as srv:
        v = client(srv.url, positions="snippet" if shift else "body")
        outcomes = asyncio.run(v.check(items()))
    assert [o.status for o in outcomes] == [Status.VALID, Status.INVALID, Status.INVALID, Status.ERROR]
    err = outcomes[1].errors[0]
    assert (err.pos.line, err.pos.column) == (2, items()[1].body.splitlines()[1].index("norm_num"))
    assert outcomes[2].sorries[0].pos.line == 2
    assert "outside the stand-in's fragment" in outcomes[3].error


def test_wrong_positions_setting_would_shift_lines() -> None:
    # The header-offset setting matters: reading a shifting server as an old one moves every line.
    with KiminaStandin(KiminaStandinConfig(shift_header_lines=True)) as srv:
        wrong = asyncio.run(client(srv.url, positions="body").check(items()[1:2]))[0]
    assert wrong.errors[0].pos.line == 2 + kimina_header_lines(items()[1].code)


def test_split_header_matches_kimina() -> None:
    header, body, n = split_header("import Mathlib.Tactic\nimport Mathlib\n\nimport Aesop\nopen Real\n\ntheorem x : True")
    assert header == "import Mathlib\nimport Aesop" and n == 4 and body.startswith("open Real")


def test_timeouts_are_timeout_verdicts_and_the_slot_is_replaced() -> None:
    # One slot: the second snippet waits for it, and gets the fresh REPL that replaced the hung one.
    with KiminaStandin(KiminaStandinConfig(max_repls=1, max_wait_s=5)) as srv:
        v = client(srv.url, timeout_s=0.5)
        hung, after = asyncio.run(v.check([LeanItem("theorem h : (1 : ℕ) = 1 := by decide -- standin:hang", HEADER),
                                            items()[0]]))
    assert hung.status is Status.TIMEOUT and "timed out" in hung.error
    assert after.status is Status.VALID


def test_429_500_and_499_are_retried_with_backoff() -> None:
    with KiminaStandin(KiminaStandinConfig(fail_statuses=[429, 500, 499])) as srv:
        v = client(srv.url)
        outcomes = asyncio.run(v.check(items()[:1]))
        assert srv.requests == 4
    assert outcomes[0].status is Status.VALID and v.stats["retries"] == 3


def test_retries_exhausted_are_error_verdicts_not_exceptions() -> None:
    with KiminaStandin(KiminaStandinConfig(fail_statuses=[429] * 10)) as srv:
        v = client(srv.url, max_retries=2, breaker_threshold=100)
        outcomes = asyncio.run(v.check(items()[:2]))
    assert all(o.status is Status.ERROR for o in outcomes)
    assert "HTTP 429" in outcomes[0].error and "No available REPLs" in outcomes[0].error


def test_busy_repls_answer_429_and_the_client_waits_its_turn() -> None:
    # One REPL slot, a batch of one snippet per request, four requests at once: the server turns the
    # extras away with 429 and the client's retries get every proof checked.
    with KiminaStandin(KiminaStandinConfig(max_repls=1, max_wait_s=0, cost_ms=100)) as srv:
        v = client(srv.url, batch_size=1, max_concurrency=4, max_retries=20, backoff_initial_s=0.05,
                   backoff_max_s=0.2, breaker_threshold=100)
        outcomes = asyncio.run(v.check([items()[0]] * 4))
    assert all(o.status is Status.VALID for o in outcomes)
    assert v.stats["retries"] >= 1


def test_auth_bearer_from_the_named_variable_and_refusals_never_echo_it(monkeypatch) -> None:
    secret = "kimina-s3cret-value"
    monkeypatch.setenv(KEY_ENV, secret)
    with KiminaStandin(KiminaStandinConfig(api_key=secret)) as srv:
        ok = asyncio.run(client(srv.url, api_key_env=KEY_ENV).check(items()[:1]))
        missing = asyncio.run(client(srv.url).check(items()[:1]))
        monkeypatch.setenv(KEY_ENV, "wrong-key")
        wrong = asyncio.run(client(srv.url, api_key_env=KEY_ENV).check(items()[:1]))
        assert srv.auth_headers[0] == f"Bearer {secret}"
    assert ok[0].status is Status.VALID
    assert missing[0].status is Status.ERROR and "api_key_env" in missing[0].error
    assert wrong[0].status is Status.ERROR and KEY_ENV in wrong[0].error
    assert secret not in wrong[0].error and "wrong-key" not in wrong[0].error


def test_unset_key_variable_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        KiminaVerifier(KiminaConfig(api_key_env=KEY_ENV))
    with pytest.raises(ValueError, match="credentials"):
        KiminaConfig(base_url="http://user:pw@localhost:8000")


def test_circuit_breaker_opens_after_consecutive_failures() -> None:
    with KiminaStandin(KiminaStandinConfig(fail_statuses=[500] * 50)) as srv:
        v = client(srv.url, max_retries=1, breaker_threshold=3, breaker_cooldown_s=60)
        first = asyncio.run(v.check(items()[:1]))
        second = asyncio.run(v.check(items()[:1]))
        requests_before = srv.requests
        third = asyncio.run(v.check(items()[:1]))
        assert srv.requests == requests_before  # an open circuit sends nothing
    assert first[0].status is Status.ERROR and "HTTP 500" in first[0].error
    assert "circuit open" in third[0].error and v.stats["breaker_opened"] == 1
    assert second[0].status is Status.ERROR


def test_dead_server_is_retried_then_an_error() -> None:
    with KiminaStandin() as srv:
        url = srv.url
    v = client(url, max_retries=1, breaker_threshold=100)
    outcome = asyncio.run(v.check(items()[:1]))[0]
    assert outcome.status is Status.ERROR and "connection failed" in outcome.error


def test_crash_is_a_500_for_the_request() -> None:
    with KiminaStandin() as srv:
        v = client(srv.url, max_retries=1, breaker_threshold=100)
        out = asyncio.run(v.check([LeanItem("theorem t : (1 : ℕ) = 1 := by decide -- standin:crash", HEADER)]))
    assert out[0].status is Status.ERROR and "HTTP 500" in out[0].error


def test_server_routes_and_request_validation() -> None:
    with KiminaStandin() as srv:
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
        dup = httpx.post(f"{srv.url}/api/check", json={"snippets": [{"id": "a", "code": "x"}] * 2})
        empty = httpx.post(f"{srv.url}/api/check/", json={"snippets": []})
        ok = httpx.post(f"{srv.url}/api/check", json={"snippets": [{"id": "a", "code": HEADER + "\ntheorem t : "
                                                                    "(1 : ℕ) = 1 := by\n  sorry"}], "timeout": 5})
    assert dup.status_code == 422 and empty.status_code == 422
    result = ok.json()["results"][0]
    assert set(result) == {"id", "time", "response"}  # `error` is left out when None
    # Current Kimina shifts lines by the import header (2 lines): the sorry is on snippet line 7.
    assert result["response"]["sorries"][0]["pos"]["line"] == 7


def test_header_reuse_on_the_server() -> None:
    with KiminaStandin(KiminaStandinConfig(max_repls=1)) as srv:
        asyncio.run(client(srv.url).check(items()[:3]))
        slots = srv._free
    assert slots is not None and len(slots) == 1 and list(slots[0].headers) == ["import Mathlib"]
