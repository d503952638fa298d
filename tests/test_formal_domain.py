"""The formal domain of the synthetic problems: the simulated prover's Lean text, checked by the stand-in
REPL (a checker of exactly this fragment, not Lean), gives per-step formal labels that match the oracle:
the step with the first mistake is False, steps before it True, later steps masked."""

from __future__ import annotations

import asyncio
import sys

from tasks.formal import chain_expr, formal_labels, prove, statement
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from storage.render import StepFormat, segment
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question
from verifiers.base import Status
from verifiers.lean.repl import ReplPool
from verifiers.lean.verdict import LeanOutcome


def solutions(n_problems: int = 24, samples: int = 6, rate: float = 0.35):
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=rate))
    fmt = StepFormat()
    out = []
    for p in load_synthetic(SyntheticSourceConfig(num_problems=n_problems, seed=3)).problems:
        spec, _ = parse_question(p.question)
        for i in range(samples):
            text = policy.sample(p.question + "\n", 11, i).text
            out.append((p, spec, [s.text for s in segment(text, fmt)]))
    return out


def check(items) -> list[LeanOutcome]:
    async def go():
        pool = ReplPool([sys.executable, "-m", "verifiers.lean.testing.repl_server"], max_repls=2, max_repl_uses=None,
                        max_repl_mem_mb=2048, timeout_s=30, header_timeout_s=30, max_wait_s=120)
        try:
            return await pool.check_many(items)
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_theorem_text_is_the_problem() -> None:
    p = load_synthetic(SyntheticSourceConfig(num_problems=1)).problems[0]
    spec, _ = parse_question(p.question)
    line = statement(spec, p.problem_id)
    assert line.startswith("theorem synth_") and line.endswith(f" = {spec.answer} := by")
    assert chain_expr(spec, 1) == f"({spec.start} : ℚ) {spec.ops[0][0]} {spec.ops[0][1]}"
    proof = prove(spec, p.problem_id, p.metadata["reference_steps"])
    assert proof.item.header == "import Mathlib"
    assert proof.item.body.splitlines()[1].startswith("  have h₁ : ") and proof.item.body.endswith(
        f"  exact h{len(spec.ops)}".translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")))


def test_reference_solutions_are_proofs() -> None:
    problems = load_synthetic(SyntheticSourceConfig(num_problems=16, seed=5)).problems
    proofs = [prove(parse_question(p.question)[0], p.problem_id, p.metadata["reference_steps"]) for p in problems]
    outcomes = check([pr.item for pr in proofs])
    assert all(o.status is Status.VALID for o in outcomes), [o.error or o.messages[:1] for o in outcomes]


def test_formal_labels_match_the_oracle() -> None:
    sols = solutions()
    proofs = [prove(spec, p.problem_id, steps) for p, spec, steps in sols]
    outcomes = check([pr.item for pr in proofs])
    wrong = 0
    for (p, spec, steps), pr, outcome in zip(sols, proofs, outcomes):
        labels = formal_labels(outcome, pr.step_lines)
        fe = first_error(spec, steps)
        if fe is None:
            assert outcome.status is Status.VALID and labels == [True] * len(steps)
            continue
        wrong += 1
        assert outcome.status is Status.INVALID
        assert labels[:fe] == [True] * fe and labels[fe] is False and all(x is None for x in labels[fe + 1:])
    assert wrong >= 20, "the sample must hold mistakes of every kind"


def test_labels_mask_what_could_not_be_judged() -> None:
    assert formal_labels(LeanOutcome(error="crash"), [2, 3]) == [None, None]
    assert formal_labels(LeanOutcome(error="slow", timed_out=True), [2]) == [None]




def test_tactic_mode_finds_the_same_first_error_and_rechecks_in_command_mode(tmp_path) -> None:
    import json

    from verifiers.lean.tactics import check_tactics

    sols = solutions(n_problems=6, samples=4)
    log = tmp_path / "requests.jsonl"

    async def go(version: str):
        pool = ReplPool([sys.executable, "-m", "verifiers.lean.testing.repl_server", "--version", version, "--log",
                         str(log)], max_repls=2, max_repl_uses=None, max_repl_mem_mb=2048, timeout_s=30,
                        header_timeout_s=30, max_wait_s=120)
        try:
            async def one(p, spec, steps):
                proof = prove(spec, p.problem_id, steps)
                lines = proof.item.body.splitlines()
                return proof, await check_tactics(pool, proof.item.header, lines[0], [t.strip() for t in lines[1:]])

            return await asyncio.gather(*(one(*s) for s in sols))
        finally:
            await pool.aclose()

    for version in ("4.18", "4.19"):
        log.unlink(missing_ok=True)
        runs = asyncio.run(go(version))
        assert any(first_error(spec, steps) is not None for _, spec, steps in sols)
        for (p, spec, steps), (proof, run) in zip(sols, runs):
            fe = first_error(spec, steps)
            assert run.first_failure == fe  # tactic mode stops at the oracle's first error
            assert run.outcome.status is (Status.VALID if fe is None else Status.INVALID)
            assert formal_labels(run.outcome, proof.step_lines)[:len(steps)] == (
                [True] * len(steps) if fe is None else [True] * fe + [False] + [None] * (len(steps) - fe - 1))
            # Before v4.19 the REPL says nothing about a finished proof; from it, it does.
            assert all(s is None for s in run.proof_status) == (version == "4.18")
        # Every run ended with the whole declaration elaborated in command mode.
        sent = {json.loads(x)["cmd"] for x in log.read_text().splitlines() if '"cmd"' in x}
        assert all(proof.item.body in sent for proof, _ in runs)


def test_label_steps_fills_rows_and_both_backends_agree() -> None:
    from tasks.formal import label_steps
    from verifiers.lean.kimina import KiminaConfig, KiminaVerifier
    from verifiers.lean.repl import LeanReplConfig, LeanReplVerifier
    from verifiers.lean.testing.kimina_server import KiminaStandin

    sols = solutions(n_problems=8, samples=3)
    problems = list({p.problem_id: p for p, _, _ in sols}.values())

    def rows():
        out = []
        for n, (p, _, steps) in enumerate(sols):
            out += [{"problem_id": p.problem_id, "solution_id": f"s{n:03d}", "step_index": i, "step_text": t,
                     "formal_label": None} for i, t in enumerate(steps)]
        out.append({"problem_id": "not-synthetic", "solution_id": "x", "step_index": 0, "step_text": "2 + 2 = 4",
                    "formal_label": None})
        return out[::-1]  # any order: labels depend on the solutions, not on how rows arrive

    repl = LeanReplVerifier(LeanReplConfig(command=[sys.executable, "-m", "verifiers.lean.testing.repl_server"]))
    by_repl = rows()
    try:
        counts = asyncio.run(label_steps(by_repl, problems, repl))
    finally:
        asyncio.run(repl.aclose())
    by_kimina = rows()
    with KiminaStandin() as srv:
        asyncio.run(label_steps(by_kimina, problems, KiminaVerifier(KiminaConfig(base_url=srv.url))))
    assert [r["formal_label"] for r in by_repl] == [r["formal_label"] for r in by_kimina]
    assert by_repl[0]["formal_label"] is None  # not a synthetic problem: untouched
    assert sum(counts.values()) == len(sols) and counts.get("invalid", 0) > 0
    for n, (p, spec, steps) in enumerate(sols):
        labels = [r["formal_label"] for r in sorted((r for r in by_repl if r["solution_id"] == f"s{n:03d}"),
                                                    key=lambda r: r["step_index"])]
        fe = first_error(spec, steps)
        assert labels == ([True] * len(steps) if fe is None else [True] * fe + [False] + [None] * (len(steps) - fe - 1))


def test_a_lean_problem_without_a_statement_is_refused_by_name() -> None:
    import pytest

    from storage.errors import SourceError
    from tasks.domains import outcome_item
    from tasks.problem import Problem

    problem = Problem(source="mine", question="Show 1 + 1 = 2.", domain="lean", formal_statement=None)
    with pytest.raises(SourceError, match="formal_statement") as err:
        outcome_item(problem, "norm_num", StepFormat())
    assert problem.problem_id in str(err.value) and err.value.field == "formal_statement"
