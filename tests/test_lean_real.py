"""The same clients against real Lean: run where `lake` and the REPL are on PATH (inside a Mathlib project,
`STEPFORGE_LEAN_PROJECT` names it), skipped with that reason everywhere else. They were not run on the
machines this was built on (no Lean toolchain installs there)."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from verifiers.base import Status
from verifiers.lean.base import LeanItem
from verifiers.lean.repl import ReplPool

REPL = shutil.which("repl")
LAKE = shutil.which("lake")
PROJECT = os.environ.get("STEPFORGE_LEAN_PROJECT")

pytestmark = pytest.mark.skipif(
    not (REPL and LAKE and PROJECT),
    reason="real Lean not available: needs `lake` and `repl` on PATH and STEPFORGE_LEAN_PROJECT set to a Mathlib "
    "project (not run on the machines this was built on)")

HEADER = "import Mathlib"


def _check(items: list[LeanItem]):
    async def go():
        pool = ReplPool([LAKE, "env", REPL], cwd=PROJECT, max_repls=1, max_repl_uses=None, max_repl_mem_mb=None,
                        timeout_s=300, header_timeout_s=900, max_wait_s=900)
        try:
            return await pool.check_many(items)
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_real_lean_agrees_with_the_stand_in_on_its_fragment() -> None:
    items = [
        LeanItem("theorem t1 : (7 : ℕ) - 10 = 0 := by\n  norm_num", HEADER),
        LeanItem("theorem t2 : (7 : ℤ) / -2 = -3 := by\n  norm_num", HEADER),
        LeanItem("theorem t3 : (48 : ℚ) + 12 = 60 := by\n  have h : (48 : ℚ) + 12 = 61 := by norm_num\n  linarith",
                 HEADER),
        LeanItem("theorem t4 : (2 : ℝ) + 2 = 4 := by\n  sorry", HEADER),
    ]
    outcomes = _check(items)
    assert [o.status for o in outcomes] == [Status.VALID, Status.VALID, Status.INVALID, Status.INVALID]
    assert [m.pos.line for m in outcomes[2].errors] == [2]
