"""The REPL pool against the stand-in REPL over real pipes and real processes: framing, error shapes,
version quirks, header reuse, timeouts that kill and replace, crashes, the memory cap, max uses, overload.
The stand-in is not Lean (see verifiers/lean/testing/checker.py); the protocol is the REPL's."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verifiers.base import Status
from verifiers.lean.base import LeanItem
from verifiers.lean.repl import LeanReplConfig, LeanReplVerifier, ReplCrashed, ReplPool
from verifiers.lean.testing.repl_server import read_request
from verifiers.lean.verdict import parse_command_response

HEADER = "import Mathlib\n\nset_option maxHeartbeats 400000\n\nopen BigOperators Real Nat Topology Rat"
STANDIN = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]


def pool(*args: str, **limits) -> ReplPool:
    kw = dict(max_repls=2, max_repl_uses=None, max_repl_mem_mb=1024, timeout_s=5.0, header_timeout_s=10.0,
              max_wait_s=10.0, crash_retries=1)
    kw.update(limits)
    return ReplPool([*STANDIN, *args], **kw)


def run(coro):
    return asyncio.run(coro)


def proof(claim: str, tactic: str = "norm_num", extra: str = "") -> LeanItem:
    return LeanItem(f"theorem t : {claim} := by\n  {tactic}{extra}", HEADER)


def raw_session(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*STANDIN, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


# --- framing --------------------------------------------------------------------------------------------


def test_answers_span_several_lines_and_end_with_a_blank_line() -> None:
    p = raw_session()
    out, _ = p.communicate((json.dumps({"cmd": "example : (2 : ℕ) + 2 = 5 := by\n  decide"}) + "\n\n").encode())
    text = out.decode()
    assert text.endswith("}\n\n")
    body = text.rstrip("\n")
    assert body.count("\n") > 3 and "\n\n" not in body  # pretty-printed, no blank line inside
    assert json.loads(body)["messages"][0]["severity"] == "error"


def test_a_raw_newline_inside_a_json_string_breaks_the_request_but_the_client_escapes_it() -> None:
    cmd = "example : (2 : ℕ) + 2 = 4 := by\n\n  decide"  # a blank line inside the proof text
    raw = '{"cmd": "' + cmd + '"}\n\n'  # newlines not escaped: what a hand-written client might send
    p = raw_session()
    out, err = p.communicate(raw.encode())
    assert p.returncode != 0 and b"uncaught exception" in err and out == b""

    async def go() -> Status:
        pl = pool()
        try:
            return (await pl.check(LeanItem(cmd.replace("example", "theorem t"), ""))).status
        finally:
            await pl.aclose()

    # json.dumps escapes the newlines, so the same text arrives intact (and `decide` needs no Mathlib).
    assert run(go()) is Status.VALID


def test_request_framing_joins_lines_like_the_repl() -> None:
    import io

    stream = io.BytesIO(b'{"cmd":\n "x"}   \n\n{"a": 1}\n\n')
    assert read_request(stream) == '{"cmd": "x"}\n'
    assert read_request(stream) == '{"a": 1}\n'
    assert read_request(stream) == ""  # end of input: the REPL stops


# --- error shapes and version quirks ---------------------------------------------------------------------


def test_every_error_shape_maps_to_its_verdict() -> None:
    async def go() -> None:
        pl = pool()
        try:
            async with pl.session(HEADER) as s:
                unknown_env = await s.request({"cmd": "theorem t : 1 = 1 := by rfl", "env": 99})
                assert unknown_env == {"message": "Unknown environment."}
                assert parse_command_response(unknown_env).status is Status.ERROR
                unknown_ps = await s.tactic(123, "rfl")
                assert unknown_ps == {"message": "Unknown proof state."}
                ok = await s.command("theorem t : (1 : ℕ) = 1 := by\n  sorry")
                failed = await s.tactic(ok["sorries"][0]["proofState"], "exact nope")
                assert failed["message"].startswith("Lean error:\n")
            # A request that is not a command kills the real REPL too: the session sees the crash.
            async with pl.session(HEADER) as s:
                with pytest.raises(ReplCrashed):
                    await s.request({"neither": "cmd nor tactic"})
            outcomes = await pl.check_many([
                proof("(2 : ℚ) + 2 = 4"),  # valid
                proof("(2 : ℚ) + 2 = 5"),  # an error message
                proof("(2 : ℚ) + 2 = 4", "sorry"),  # sorries and the sorry warning
                proof("(2 : ℚ) + 2 = 4", "nlinarith"),  # outside the stand-in's fragment: REPL-level error
                LeanItem("theorem t : (1 : ℕ) = 1 := by decide", "import NoSuchLib"),  # the header fails
            ])
            assert [o.status for o in outcomes] == [Status.VALID, Status.INVALID, Status.INVALID, Status.ERROR,
                                                    Status.ERROR]
            assert "header failed" in outcomes[4].error and "NoSuchLib" in outcomes[4].error
        finally:
            await pl.aclose()

    run(go())


@pytest.mark.parametrize("version", ["4.18", "4.19"])
def test_tactic_mode_goals_empty_is_not_solved_before_proof_status(version: str) -> None:
    async def go() -> tuple[dict, dict]:
        pl = pool("--version", version)
        try:
            async with pl.session(HEADER) as s:
                ps = (await s.command("theorem t : (3 : ℚ) * 4 = 12 := by\n  sorry"))["sorries"][0]["proofState"]
                recovered = await s.tactic(ps, "have h : (3 : ℚ) * 4 = 13 := by norm_num")
                closed = await s.tactic(recovered["proofState"], "linarith")
                clean = await s.tactic(ps, "norm_num")
                return closed, clean
        finally:
            await pl.aclose()

    closed, clean = run(go())
    # Both have no goals left; only one is a proof. Before v4.19 nothing in the answer tells them apart.
    assert closed["goals"] == [] and clean["goals"] == []
    if version == "4.18":
        assert "proofStatus" not in closed and "proofStatus" not in clean
    else:
        assert closed["proofStatus"] == "Incomplete: contains sorry"
        assert clean["proofStatus"] == "Completed"


@pytest.mark.parametrize("version", ["4.27", "4.28"])
def test_sorry_warning_in_both_quotings_is_invalid(version: str) -> None:
    async def go():
        pl = pool("--version", version)
        try:
            return await pl.check(proof("(2 : ℝ) + 2 = 4", "sorry"))
        finally:
            await pl.aclose()

    outcome = run(go())
    warning = [m.data for m in outcome.messages if m.severity == "warning"]
    assert warning == ["declaration uses 'sorry'" if version == "4.27" else "declaration uses `sorry`"]
    assert outcome.status is Status.INVALID


# --- header reuse, limits and faults ----------------------------------------------------------------------


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_header_runs_once_per_process_and_its_env_is_reused(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    other = "import Mathlib\nopen Nat"

    async def go():
        pl = pool("--log", str(log), max_repls=2)
        try:
            first = await pl.check_many([proof(f"({i} : ℚ) + 1 = {i + 1}") for i in range(6)])
            second = await pl.check_many([LeanItem(f"theorem t : ({i} : ℕ) + 1 = {i + 1} := by decide", other)
                                          for i in range(3)])
            return first + second
        finally:
            await pl.aclose()

    outcomes = run(go())
    assert all(o.status is Status.VALID for o in outcomes)
    requests = _log(log)
    headers = [r for r in requests if "env" not in r]
    proofs = [r for r in requests if "env" in r]
    assert len(proofs) == 9
    pids = {r["pid"] for r in requests}
    assert len(pids) <= 2
    # Each (process, header) pair elaborated its header exactly once.
    pairs = [(r["pid"], r["cmd"]) for r in headers]
    assert len(pairs) == len(set(pairs)) and {c for _, c in pairs} == {HEADER, other}
    envs = {(r["pid"], r["env"]) for r in proofs}
    assert len(envs) <= 4  # the proofs reused the header environments


def test_timeout_kills_the_process_group_and_replaces_the_process() -> None:
    async def go():
        pl = pool(timeout_s=1.0, max_repls=1)
        try:
            hung = await pl.check(proof("(1 : ℚ) = 1", extra="  -- standin:hang"))
            assert pl.size == 0  # the hung process is gone, its slot free
            after = await pl.check(proof("(1 : ℚ) = 1"))
            return hung, after, pl.pids(), pl.stats
        finally:
            await pl.aclose()

    hung, after, pids, stats = run(go())
    assert hung.status is Status.TIMEOUT and "process group killed" in hung.error
    dead_pid = int(hung.error.rsplit("pid ", 1)[1].rstrip(")"))
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    assert after.status is Status.VALID and pids and dead_pid not in pids
    assert stats["killed_timeout"] == 1


def test_crash_is_retried_on_a_fresh_process_then_reported(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"

    async def go():
        pl = pool()
        try:
            once = await pl.check(proof("(2 : ℚ) + 2 = 4", extra=f"  -- standin:crash-once:{marker}"))
            always = await pl.check(proof("(2 : ℚ) + 2 = 4", extra="  -- standin:crash"))
            after = await pl.check(proof("(2 : ℚ) + 2 = 4"))
            return once, always, after, dict(pl.stats)
        finally:
            await pl.aclose()

    once, always, after, stats = run(go())
    assert once.status is Status.VALID and marker.exists()  # crashed, retried, answered
    assert always.status is Status.ERROR and "died" in always.error and "INTERNAL PANIC" in always.error
    assert after.status is Status.VALID
    assert stats["crashed"] == 3  # once + twice (first try and its retry)


def test_memory_cap_ends_a_growing_process_with_an_error_verdict() -> None:
    async def go():
        pl = pool("--grow-mb", "96", max_repl_mem_mb=400, max_repls=1, crash_retries=0)
        try:
            return [await pl.check(proof(f"({i} : ℚ) = {i}")) for i in range(8)]
        finally:
            await pl.aclose()

    outcomes = run(go())
    statuses = [o.status for o in outcomes]
    assert Status.ERROR in statuses and statuses[0] is Status.VALID
    died = next(o for o in outcomes if o.status is Status.ERROR)
    assert "out of memory" in died.error
    assert statuses[-1] is Status.VALID or Status.ERROR in statuses[statuses.index(Status.ERROR) + 1:]


def test_max_uses_recycles_processes(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"

    async def go():
        pl = pool("--log", str(log), max_repls=1, max_repl_uses=3)
        try:
            outs = [await pl.check(proof(f"({i} : ℚ) = {i}")) for i in range(7)]
            return outs, dict(pl.stats)
        finally:
            await pl.aclose()

    outs, stats = run(go())
    assert all(o.status is Status.VALID for o in outs)
    per_pid: dict[int, int] = {}
    for r in _log(log):
        if "env" in r:
            per_pid[r["pid"]] = per_pid.get(r["pid"], 0) + 1
    assert sorted(per_pid.values()) == [1, 3, 3] and stats["recycled"] == 2


def test_overload_is_a_clear_error_after_a_bounded_wait() -> None:
    async def go():
        pl = pool(max_repls=1, max_wait_s=0.3, timeout_s=3.0)
        try:
            return await pl.check_many([proof("(1 : ℚ) = 1", extra="  -- standin:hang"), proof("(1 : ℚ) = 1")])
        finally:
            await pl.aclose()

    hung, waiting = run(go())
    assert hung.status is Status.TIMEOUT
    assert waiting.status is Status.ERROR and "overloaded" in waiting.error and "max_repls" in waiting.error


def test_pool_never_exceeds_max_repls_and_logs_its_limits(caplog, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    caplog.set_level(logging.INFO, logger="verifiers.lean.repl")

    async def go():
        pl = pool("--log", str(log), "--cost-ms", "20", max_repls=3)
        try:
            return await pl.check_many([proof(f"({i} : ℚ) + 0 = {i}") for i in range(30)])
        finally:
            await pl.aclose()

    outs = run(go())
    assert all(o.status is Status.VALID for o in outs)
    assert len({r["pid"] for r in _log(log)}) == 3
    assert any("max_repls=3" in r.message and "max_repl_mem=1024 MiB" in r.message for r in caplog.records)


def test_verifier_from_config_and_callers_on_other_event_loops() -> None:
    cfg = LeanReplConfig(command=STANDIN, max_repls=2)
    v = LeanReplVerifier(cfg)
    try:
        # Two separate event loops (like two shard threads) share one pool.
        a = asyncio.run(v.verify([proof("(1 : ℚ) + 1 = 2")]))
        b = asyncio.run(v.verify([proof("(1 : ℚ) + 1 = 3"), proof("(1 : ℚ) = 1", "sorry")]))
    finally:
        asyncio.run(v.aclose())
    assert [x.status for x in a + b] == [Status.VALID, Status.INVALID, Status.INVALID]
    assert b[0].detail.startswith("error at 2:2") and a[0].verifier == "lean-repl"


def test_serve_lean_cli_speaks_the_repl_protocol() -> None:
    exe = Path(sys.executable).with_name("stepforge")
    p = subprocess.run([str(exe), "serve-lean", "--protocol", "repl", "--version", "4.28"],
                       input=(json.dumps({"cmd": "example : (1 : ℕ) = 1 := by\n  sorry"}) + "\n\n").encode(),
                       capture_output=True, timeout=60)
    answer = json.loads(p.stdout.decode())
    assert p.returncode == 0 and answer["messages"][0]["data"] == "declaration uses `sorry`"


def test_shared_pool_outlives_its_verifiers_and_no_process_outlives_the_interpreter(tmp_path: Path) -> None:
    cfg = LeanReplConfig(command=[*STANDIN, "--log", str(tmp_path / "log.jsonl")], max_repls=1)
    a, b = LeanReplVerifier(cfg, shared=True), LeanReplVerifier(cfg, shared=True)
    assert a.pool is b.pool
    asyncio.run(a.verify([proof("(1 : ℚ) = 1")]))
    asyncio.run(a.aclose())  # a shared pool stays up for the next shard
    asyncio.run(b.verify([proof("(2 : ℚ) = 2")]))
    assert len({r["pid"] for r in _log(tmp_path / "log.jsonl")}) == 1
    # A pool left open by a child interpreter is killed at its exit, even a REPL busy on a hung proof (it
    # runs in its own session and is not reading its input, so nothing else would end it).
    script = ("import asyncio, threading, time\nfrom verifiers.lean.repl import ReplPool\n"
              "from verifiers.lean.base import LeanItem\n"
              f"p = ReplPool({STANDIN!r}, max_repls=1, max_repl_uses=None, max_repl_mem_mb=None, timeout_s=600, "
              "header_timeout_s=5, max_wait_s=5)\n"
              "item = LeanItem('theorem t : (1 : ℕ) = 1 := by decide -- standin:hang')\n"
              "threading.Thread(target=asyncio.run, args=(p.check(item),), daemon=True).start()\n"
              "while not p.pids(): time.sleep(0.05)\ntime.sleep(0.5)\nprint(p.pids()[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.strip())
    import time as _t
    deadline = _t.monotonic() + 30
    while _t.monotonic() < deadline:
        if _ended(pid):
            break
        _t.sleep(0.1)
    else:
        pytest.fail(f"REPL process {pid} outlived its interpreter")


def _ended(pid: int) -> bool:
    """The process is gone, or is a zombie: dead, only its exit status left for a parent to collect. Once
    the interpreter exits, that parent is whoever adopts orphans (PID 1 or a subreaper), and when it reaps
    is up to it: a CI container whose PID 1 reaps late or never keeps the zombie for `os.kill(pid, 0)`."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
