"""Formal sources: miniF2F (all 488 Lean 4 statements, none provable by `sorry`) and the LeanDojo Benchmark
JSON, read without LeanDojo."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from storage.errors import SourceError
from tasks.sources.lean import (LeanDojoBenchmarkSourceConfig, MiniF2FSourceConfig, load_leandojo_benchmark,
                                load_minif2f)
from verifiers.base import Status
from verifiers.lean.base import LeanItem
from verifiers.lean.kimina import KiminaConfig, KiminaVerifier
from verifiers.lean.repl import ReplPool
from verifiers.lean.testing.kimina_server import KiminaStandin

MINIF2F = Path(__file__).resolve().parent / "fixtures" / "minif2f" / "minif2f_lean4.jsonl"


def test_all_488_minif2f_statements_load_with_header_and_statement() -> None:
    result = load_minif2f(MiniF2FSourceConfig(path=str(MINIF2F)))
    assert len(result.problems) == 488 and not result.quarantined and result.duplicates == 0
    assert {p.metadata["split"] for p in result.problems} == {"test", "valid"}
    for p in result.problems:
        assert p.domain == "lean" and p.source == "minif2f" and p.answer is None
        assert p.header.startswith("import Mathlib") and p.formal_statement.endswith(":= by")
        assert p.formal_statement.startswith(("theorem", "lemma"))
        row = p.to_row()
        assert row["header"] == p.header and row["formal_statement"] == p.formal_statement
    test = load_minif2f(MiniF2FSourceConfig(path=str(MINIF2F), split="test", limit=10))
    assert len(test.problems) == 10 and all(p.metadata["split"] == "test" for p in test.problems)


def test_minif2f_bad_records_are_quarantined(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    good = {"name": "x", "split": "test", "header": "import Mathlib", "formal_statement": "theorem x : True := by"}
    f.write_text("\n".join([json.dumps(good), json.dumps({**good, "formal_statement": ""}), "{oops"]) + "\n")
    result = load_minif2f(MiniF2FSourceConfig(path=str(f)))
    assert len(result.problems) == 1
    assert [q.record for q in result.quarantined] == ["m.jsonl:line 2", "m.jsonl:line 3"]
    assert "formal_statement" in result.quarantined[0].reason
    with pytest.raises(SourceError, match="source.path"):
        load_minif2f(MiniF2FSourceConfig(path=str(tmp_path / "missing.jsonl")))


def _sorry_items() -> list[LeanItem]:
    problems = load_minif2f(MiniF2FSourceConfig(path=str(MINIF2F))).problems
    return [LeanItem(f"{p.formal_statement}\n  sorry", p.header, p.metadata["name"]) for p in problems]


def test_a_sorry_proof_of_any_minif2f_statement_is_never_valid() -> None:
    items = _sorry_items()

    async def go():
        pool = ReplPool([sys.executable, "-m", "verifiers.lean.testing.repl_server"], max_repls=2,
                        max_repl_uses=None, max_repl_mem_mb=2048, timeout_s=30, header_timeout_s=30, max_wait_s=60)
        try:
            return await pool.check_many(items)
        finally:
            await pool.aclose()

    outcomes = asyncio.run(go())
    assert len(outcomes) == 488
    assert all(o.status is not Status.VALID for o in outcomes)
    # The stand-in answers every one with Lean's sorry shape: the warning and a `sorries` entry.
    assert all(o.status is Status.INVALID and o.has_sorry and o.sorries for o in outcomes)


def test_sorry_proofs_through_kimina_are_never_valid() -> None:
    items = _sorry_items()[:40]
    with KiminaStandin() as srv:
        outcomes = asyncio.run(KiminaVerifier(KiminaConfig(base_url=srv.url, batch_size=20)).check(items))
    assert all(o.status is Status.INVALID for o in outcomes)
    # Positions come back relative to the body: the sorry is on the proof's last line.
    assert all(o.sorries[0].pos.line == it.body.count("\n") + 1 for o, it in zip(outcomes, items))


def test_leandojo_benchmark_json_reads_without_leandojo(tmp_path: Path) -> None:
    data = [
        {"url": "https://github.com/leanprover-community/mathlib4", "commit": "abc1234", "file_path": "Mathlib/X.lean",
         "full_name": "Nat.foo", "start": [1, 1], "end": [3, 1],
         "traced_tactics": [
             {"tactic": "intro n", "annotated_tactic": ["intro n", []], "state_before": "⊢ ∀ (n : ℕ), n + 0 = n",
              "state_after": "n : ℕ\n⊢ n + 0 = n"},
             {"tactic": "rfl", "annotated_tactic": ["rfl", []], "state_before": "n : ℕ\n⊢ n + 0 = n",
              "state_after": "no goals"}]},
        {"url": "u", "commit": "c", "file_path": "Mathlib/Y.lean", "full_name": "Nat.bar", "traced_tactics": []},
        {"file_path": "Mathlib/Z.lean", "traced_tactics": [{"tactic": "simp"}]},
    ]
    f = tmp_path / "test.json"
    f.write_text(json.dumps(data))
    result = load_leandojo_benchmark(LeanDojoBenchmarkSourceConfig(path=str(f)))
    assert len(result.problems) == 1 and len(result.quarantined) == 2
    p = result.problems[0]
    assert p.domain == "lean" and p.metadata["reference_steps"] == ["intro n", "rfl"]
    assert p.metadata["states"][1] == ["n : ℕ\n⊢ n + 0 = n", "no goals"]
    assert p.question == "Nat.foo\n⊢ ∀ (n : ℕ), n + 0 = n"
    assert "traced_tactics" in result.quarantined[0].reason and "full_name" in result.quarantined[1].reason
    f.write_text("{}")
    with pytest.raises(SourceError, match="not a list"):
        load_leandojo_benchmark(LeanDojoBenchmarkSourceConfig(path=str(f)))
