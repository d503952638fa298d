"""The code step check: sandboxed runs of a step's Python, and the simulated policy's code-step format."""

from __future__ import annotations

import asyncio
import os
import random
import time
from fractions import Fraction

import pytest

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.sources.synthetic import apply_op, first_error, generate_spec, parse_step
from verifiers.base import Status, StepItem
from verifiers.code_check import CodeCheck, CodeCheckConfig, extract


def _run(texts: list[str], **cfg) -> list:
    async def go():
        check = CodeCheck(CodeCheckConfig(**cfg))
        try:
            return await check.verify([StepItem(t) for t in texts])
        finally:
            await check.aclose()

    return asyncio.run(go())


def test_claims_outputs_and_errors():
    cases = [
        ("Ava gets 5 more: 10 + 5 = 15. <code>print(10 + 5)</code>", Status.VALID, "printed 15"),
        ("Ava gets 5 more: 10 + 5 = 17. <code>print(10 + 5)</code>", Status.INVALID, "claims 17"),
        ("The share is 10 / 3 = 3.33.\n```python\nprint(10 / 3)\n```", Status.VALID, "printed 3.33"),
        ("The total is $1,200.\n```py\nx = 400 * 3\nprint(x)\n```\nso total = $1,200", Status.VALID, "1200"),
        ("Then x <code>1 / 0</code>", Status.INVALID, "ZeroDivisionError"),
        ("Then x <code>print(undefined_name)</code>", Status.INVALID, "NameError"),
        ("No code: 1 + 1 = 2", Status.NONE, "no code"),
        ("```javascript\nconsole.log(1)\n```", Status.NONE, "no code"),
        ("It runs <code>print('hello')</code> = 4", Status.VALID, "printed no number"),
    ]
    verdicts = _run([c[0] for c in cases])
    for (text, status, detail), v in zip(cases, verdicts):
        assert v.status is status, (text, v)
        assert detail in v.detail, (text, v.detail)
        assert v.verifier == "code-check"


def test_sandbox_refuses_network_processes_and_writes(tmp_path):
    target = tmp_path / "written.txt"
    cases = [
        "<code>import socket; socket.create_connection(('127.0.0.1', 9))</code>",
        "<code>import subprocess; subprocess.run(['true'])</code>",
        "<code>import os; os.system('true')</code>",
        f"<code>open({str(target)!r}, 'w').write('x')</code>",
        "<code>import ctypes</code>",
        # A step's `except Exception` cannot swallow the refusal.
        "<code>\ntry:\n    import socket; socket.socket()\nexcept Exception:\n    print(1)\n</code>",
    ]
    verdicts = _run(cases)
    for text, v in zip(cases, verdicts):
        assert v.status is Status.ERROR and "sandbox refused" in v.detail, (text, v)
    assert not target.exists()


def test_cpu_memory_and_wall_limits():
    t0 = time.monotonic()
    # A generous wall limit, so the CPU limit (1 s of CPU, however loaded the machine) is what ends it.
    cpu, mem = _run(["<code>while True: pass</code>", "<code>x = ' ' * (2 ** 34)</code>"],
                    cpu_s=1, timeout_s=60, memory_mb=256)
    assert cpu.status is Status.TIMEOUT and "CPU" in cpu.detail
    assert mem.status is Status.INVALID and "MemoryError" in mem.detail
    (wall,) = _run(["<code>import time; time.sleep(30)</code>"], timeout_s=1)
    assert wall.status is Status.TIMEOUT and "wall" in wall.detail
    assert time.monotonic() - t0 < 25  # nothing waited for the 30 s sleep


def test_wall_timeout_leaves_no_process_behind():
    verdicts = _run(["<code>import time; time.sleep(30)</code>"], timeout_s=1)
    assert verdicts[0].status is Status.TIMEOUT
    # The child's command line holds the sandbox preamble; after the kill no such process is left.
    leftover = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"SandboxDenied" in f.read():
                    leftover.append(pid)
        except OSError:
            pass
    assert leftover == []


def test_extract_markers_and_claims():
    cfg = CodeCheckConfig(marker_open="[[", marker_close="]]")
    step = extract("Then 6 * 7 = 42. [[print(6 * 7)]] The answer is 42.", cfg)
    assert step is not None and step.code == "print(6 * 7)" and step.claim == 42
    assert extract("Then 6 * 7 = 42. <code>print(6 * 7)</code>", cfg) is None
    assert extract("The answer is 3.5 <code>print(7/2)</code>", CodeCheckConfig()).claim == Fraction(7, 2)
    with pytest.raises(ValueError, match="marker_open"):
        CodeCheckConfig(marker_open="")


def test_simulated_code_steps_caught_exactly_when_the_stated_result_is_wrong():
    """The simulated policy's code-step format: at the oracle's first error the code check says invalid
    exactly when the stated result does not follow from the written operands (a wrong result); a wrong
    operand or operation is computed consistently and passes."""
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.5, code_steps=True))
    assert policy.policy_id.endswith("/code")
    rng = random.Random(5)
    firsts: list[tuple[str, bool]] = []
    correct: list[str] = []
    for n in range(60):
        spec = generate_spec(rng, 3, 6)
        text = policy.sample(spec.question() + "\n", seed=n, index=0).text
        steps = [s.split(": ", 1)[1] for s in text.strip().split("\n")]
        assert all("<code>print(" in s for s in steps)
        fe = first_error(spec, steps)
        correct += steps[: fe if fe is not None else len(steps)]
        if fe is not None:
            p = parse_step(steps[fe])
            firsts.append((steps[fe], abs(apply_op(p.a, p.op, p.x) - p.c) > Fraction(1, 100)))
    verdicts = _run(correct[:40] + [s for s, _ in firsts], workers=8)
    assert all(v.status is Status.VALID for v in verdicts[:40])
    for (step, slip), v in zip(firsts, verdicts[40:]):
        assert v.status is (Status.INVALID if slip else Status.VALID), (step, v)
    assert any(slip for _, slip in firsts) and not all(slip for _, slip in firsts)
