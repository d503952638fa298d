"""The MUSTARD-style loop (tasks/mustard), checked by the stand-in Lean REPL and Kimina server over their real
transports (a checker of a stated fragment, not Lean): revisions fix the simulated author's seeded mistakes,
more revisions pass more seeds, every attempt's verdict is kept, and checks that hang or crash end as
`timeout` / `error`, never `invalid`, and are never revised."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Sequence

import pytest

from tasks.mustard.concepts import Concept, Seed, expand_seeds, load_concepts
from tasks.mustard.pipeline import LoopSettings, merge_stats, run_mustard, stats
from tasks.mustard.texts import FEEDBACK_LINE_RE, MalformedAnswer, lean_file, parse_answer
from tasks.policy.base import Completion, GenerationRequest, PolicyUsage
from tasks.policy.simulated_author import SimulatedAuthor, SimulatedAuthorConfig, evaluate
from tasks.prompt import load_template
from verifiers.lean.kimina import KiminaConfig, KiminaVerifier
from verifiers.lean.repl import LeanReplConfig, LeanReplVerifier
from verifiers.lean.testing.kimina_server import KiminaStandin

STANDIN = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]


def settings(max_revisions: int, seed: int = 0) -> LoopSettings:
    return LoopSettings(max_revisions, 0.7, 2048, "import Mathlib", seed, load_template("mustard-author"),
                        load_template("mustard-revise"))


def repl(*args: str, **limits) -> LeanReplVerifier:
    cfg = dict(max_repls=2, max_repl_mem_mb=None, timeout_s=60, max_wait_s=300)
    cfg.update(limits)
    return LeanReplVerifier(LeanReplConfig(command=[*STANDIN, *args], **cfg))


def run(seeds: Sequence[Seed], author, checker, max_revisions: int):
    async def go():
        try:
            return await run_mustard(seeds, author, checker, settings(max_revisions))
        finally:
            await checker.aclose()

    return asyncio.run(go())


SEEDS = expand_seeds(load_concepts(), 3)  # 18 concepts x 3


def changed_lines(before: str, after: str) -> set[int]:
    a, b = before.split("\n"), after.split("\n")
    assert len(a) == len(b), "a revision keeps the proof's shape"
    return {i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y}


def test_revisions_fix_the_seeded_mistakes_lean_names() -> None:
    author = SimulatedAuthor(SimulatedAuthorConfig(mistake_rate=0.3, fix_rate=1.0))
    results = run(SEEDS, author, repl(), max_revisions=2)
    revised = 0
    for r in results:
        # With every named line fixed, one revision is always enough.
        assert r.status == "passed", (r.seed.seed_id, [a.verdict for a in r.attempts])
        assert [a.status for a in r.attempts] == ["invalid"] * r.revisions + ["valid"]
        assert r.attempts[-1].verdict["verifier"] == "lean-repl" and r.attempts[-1].verdict["score"] == 1.0
        for before, after in zip(r.attempts, r.attempts[1:]):
            revised += 1
            named = {int(m.group("line")) for m in FEEDBACK_LINE_RE.finditer(before.feedback)
                     if m.group("kind") != "warning"}
            changed = changed_lines(before.answer.formal, after.answer.formal)
            # The author changed exactly what Lean named (no silent rewrite of other lines) and kept the texts.
            assert changed and changed <= named, (before.feedback, before.answer.formal, after.answer.formal)
            assert (after.answer.problem, after.answer.informal) == (before.answer.problem, before.answer.informal)
            assert before.verdict["status"] == "invalid" and before.verdict["detail"].startswith(("error at", "proof uses"))
    assert revised >= 15, "the sample must exercise revisions"


def test_the_mistakes_are_the_known_kinds_and_lean_names_their_lines() -> None:
    kinds = {"wrong_value": 0, "sorry": 0, "wrong_name": 0}
    author = SimulatedAuthor(SimulatedAuthorConfig(mistake_rate=0.5, fix_rate=1.0))
    for r in run(SEEDS, author, repl(), max_revisions=1):
        first = r.attempts[0]
        named = {int(m.group("line")) for m in FEEDBACK_LINE_RE.finditer(first.feedback) if m.group("kind") != "warning"}
        mistakes = set()
        for no, line in enumerate(first.answer.formal.split("\n"), start=1):
            stripped = line.strip()
            if stripped.startswith("have ") and stripped.endswith("by sorry"):
                kinds["sorry"] += 1
                mistakes.add(no)
            elif stripped.startswith("have "):
                lhs, rhs = stripped.split(" : ", 1)[1].split(" := by")[0].split(" = ")
                value, typ = evaluate(lhs)
                if value != evaluate(f"({rhs} : {typ})")[0]:
                    kinds["wrong_value"] += 1
                    mistakes.add(no)
            elif stripped.startswith("exact ") and no in named:
                kinds["wrong_name"] += 1
                mistakes.add(no)
        # Lean names every seeded mistake (and the closing `exact` of a wrong last step), nothing else.
        assert mistakes <= named and (first.status == "invalid") == bool(mistakes), (first.answer.formal, first.feedback)
    assert all(n >= 3 for n in kinds.values()), kinds


def test_more_revisions_pass_more_seeds_and_keep_the_first_attempts() -> None:
    r0 = run(SEEDS, SimulatedAuthor(), repl(), max_revisions=0)
    r2 = run(SEEDS, SimulatedAuthor(), repl(), max_revisions=2)
    s0, s2 = merge_stats([stats(r0)]), merge_stats([stats(r2)])
    # mistake_rate 0.2 per formal step (2-4 steps and the closing exact): roughly half pass at once;
    # each mistake Lean names is fixed with probability 0.8 per revision.
    assert 0.25 <= s0["pass_rate"] <= 0.75, s0
    assert s2["pass_rate"] >= s0["pass_rate"] + 0.25 and s2["pass_rate"] >= 0.85, (s0, s2)
    assert s0["passed_after_revisions"] == {"0": s0["passed"]} and s0["failed"] == {"invalid": s0["seeds"] - s0["passed"]}
    assert set(s2["passed_after_revisions"]) >= {"0", "1"}
    assert s2["passed_after_revisions"]["0"] == s0["passed"]  # request seeds depend on (seed, seed id, revision)
    for a, b in zip(r0, r2):
        assert a.attempts[0].text == b.attempts[0].text
    assert s2["author_requests"] == sum(len(r.attempts) for r in r2) == s2["lean_checks"]
    assert s2["seeds"] == s2["passed"] + sum(s2["failed"].values()) and len(s2["failures"]) == sum(s2["failed"].values())


def test_hangs_and_crashes_are_timeout_and_error_never_invalid_and_never_revised() -> None:
    checker = repl("--hang-rate", "0.2", "--crash-rate", "0.2", "--seed", "5", max_repls=4, timeout_s=5,
                   crash_retries=0)
    results = run(SEEDS[:36], SimulatedAuthor(), checker, max_revisions=2)
    statuses = [a.status for r in results for a in r.attempts]
    assert statuses.count("timeout") >= 2 and statuses.count("error") >= 2, statuses
    for r in results:
        for a in r.attempts[:-1]:
            assert a.status == "invalid", "only a proof Lean rejected is revised"
        last = r.attempts[-1]
        if last.status == "timeout":
            assert r.status == "timeout" and last.verdict["status"] == "timeout" and "timed out" in last.verdict["detail"]
        if last.status == "error":
            assert r.status == "error" and "died" in last.verdict["detail"] and last.verdict["score"] is None
    s = merge_stats([stats(results)])
    assert s["failed"].get("timeout", 0) >= 2 and s["failed"].get("error", 0) >= 2
    recorded = {f["seed_id"]: f["status"] for f in s["failures"]}
    for r in results:
        assert recorded.get(r.seed.seed_id, "passed") == r.status  # kept, with the reason, not dropped
    assert s["seeds"] == s["passed"] + sum(s["failed"].values()) == 36


class FixedAuthor:
    """A test double of an author model that always answers `text` (the loop's handling is under test)."""

    policy_id = "fixed"
    max_batch = 64

    def __init__(self, text: str) -> None:
        self.text = text
        self.usage = PolicyUsage()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return [[Completion(self.text, "stop")] for _ in requests]

    async def aclose(self) -> None:
        return None


def test_a_proof_outside_the_fragment_is_error_and_a_malformed_answer_is_kept_as_such() -> None:
    seeds = [Seed(Concept(id="x", level="middle school", concept="exponents"), 0)]
    outside = ("Problem:\nProve that 2 + 2 = 4.\n\nInformal proof:\nAdd.\n\nFormal proof:\n```lean\nimport Mathlib\n\n"
               "theorem t : (2 : ℕ) + 2 = 4 := by\n  omega\n```\n")
    [r] = run(seeds, FixedAuthor(outside), repl(), max_revisions=2)
    assert r.status == "error" and len(r.attempts) == 1 and "outside the stand-in's fragment" in r.attempts[0].verdict["detail"]
    [r] = run(seeds, FixedAuthor("Here is a problem: 2 + 2 = 4."), repl(), max_revisions=2)
    assert r.status == "malformed" and len(r.attempts) == 1
    assert r.attempts[0].verdict == {"verifier": "mustard-format", "version": "1", "status": "error", "score": None,
                                     "detail": "malformed answer: no `Problem:` section"}
    unknown = [Seed(Concept(id="topo", level="higher education", concept="homotopy groups of spheres"), 0)]
    [r] = run(unknown, SimulatedAuthor(), repl(), max_revisions=1)
    assert r.status == "malformed" and "no `Problem:` section" in r.attempts[0].verdict["detail"]


def test_answer_format() -> None:
    a = parse_answer("**Problem:** Prove x.\n\n## Informal proof:\nBecause.\n\nFormal proof:\n```lean4\ntheorem t : "
                     "(1 : ℕ) = 1 := by\n  rfl\n```")
    assert (a.problem, a.informal, a.formal) == ("Prove x.", "Because.", "theorem t : (1 : ℕ) = 1 := by\n  rfl")
    f = lean_file(a.formal, "import Mathlib")
    assert f.item.header == "import Mathlib" and f.offset == 0 and f.statement == "theorem t : (1 : ℕ) = 1 := by"
    f = lean_file("import Mathlib\nimport Aesop\n\ntheorem t : (1 : ℕ) = 1 := by\n  rfl", "import Mathlib")
    assert f.item.header == "import Mathlib\nimport Aesop" and f.offset == 3 and f.item.body.startswith("theorem t")
    for text, missing in (("Problem:\nx\n\nFormal proof:\n```lean\nx\n```", "no `Informal proof:` section"),
                          ("Problem:\nx\nInformal proof:\ny\nFormal proof:\nno block", "no fenced ```lean block"),
                          ("Problem:\n\nInformal proof:\ny\nFormal proof:\n```lean\nx\n```", "`Problem:` section is empty")):
        with pytest.raises(MalformedAnswer, match=missing.replace("`", ".").replace("(", ".")):
            parse_answer(text)


def test_http_author_and_kimina_give_the_same_records_as_in_process_and_the_repl() -> None:
    from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
    from tasks.testing.standin_server import StandinServer, StandinServerConfig

    seeds = SEEDS[:24]
    local = run(seeds, SimulatedAuthor(), repl(), max_revisions=2)
    with StandinServer(StandinServerConfig(author_model="sim-author")) as server, KiminaStandin() as kimina:
        author = OpenAIPolicy(OpenAIPolicyConfig(base_url=[server.base_url], model="sim-author"))
        remote = run(seeds, author, KiminaVerifier(KiminaConfig(base_url=kimina.url)), max_revisions=2)
        assert server.stats.answered == sum(len(r.attempts) for r in remote)
    assert [[a.text for a in r.attempts] for r in local] == [[a.text for a in r.attempts] for r in remote]
    assert [[a.feedback for a in r.attempts] for r in local] == [[a.feedback for a in r.attempts] for r in remote]
    assert [r.status for r in local] == [r.status for r in remote]
    assert {a.verdict["verifier"] for r in remote for a in r.attempts} == {"lean-kimina"}
    assert any(r.revisions for r in remote)


def test_concept_files_are_checked(tmp_path: Path) -> None:
    from storage.errors import ConfigError, SourceError

    assert len(load_concepts()) >= 16 and {c.level for c in load_concepts()} == {
        "elementary school", "middle school", "high school", "higher education"}
    assert {c.level for c in load_concepts(levels=["high school"])} == {"high school"}
    with pytest.raises(ConfigError, match="levels"):
        load_concepts(levels=["kindergarten"])
    bad = tmp_path / "c.yaml"
    bad.write_text("concepts:\n  - {id: a, level: x, concept: y}\n  - {id: b, level: x}\n")
    with pytest.raises(SourceError, match=r"concept 2: field `concept`: Field required"):
        load_concepts(str(bad))
    bad.write_text('{"concepts": [{"id": "a", "level": "x", "concept": "y"}, {"id": "a", "level": "x", "concept": "z"}]}')
    with pytest.raises(SourceError, match=r"concept 2: field `id`: 'a' is already"):
        load_concepts(str(bad))
