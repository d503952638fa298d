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


def test_real_lean_agrees_with_the_stand_in_on_the_simulated_mustard_author() -> None:
    """The MUSTARD author's Lean (tasks/policy/simulated_author.py) is meant to be real Lean: every shipped
    concept's clean proof is valid, and a proof with its seeded mistakes gets the stand-in's verdict."""
    from tasks.mustard.concepts import expand_seeds, load_concepts
    from tasks.mustard.pipeline import Prompts
    from tasks.mustard.texts import lean_file, parse_answer
    from tasks.policy.simulated_author import author_answer
    from tasks.prompt import load_template
    from verifiers.lean.testing.engine import StandinLean

    prompts = Prompts(load_template("mustard-author"), load_template("mustard-revise"))
    items, expected = [], []
    standin = StandinLean("4.19")
    header_env = standin.command(HEADER)["env"]
    for seed in expand_seeds(load_concepts(), 2):
        for rate in (0.0, 0.5):
            item = lean_file(parse_answer(author_answer(prompts.first(seed), 0, seed.index, rate, 1.0)).formal, HEADER).item
            answer = standin.command(item.body, header_env)
            items.append(item)
            expected.append(Status.INVALID if answer.get("messages") or answer.get("sorries") else Status.VALID)
    assert [o.status for o in _check(items)] == expected
