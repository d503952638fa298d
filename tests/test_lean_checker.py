"""The stand-in's checker and the verdict rules, against what Lean decides.

Each row of the regression table is a closed statement whose truth in Lean is known (Lean's ℕ truncates
subtraction and floors division, ℤ division is Euclidean, x / 0 = 0), checked through the REPL engine's
command mode, so the JSON shapes are exercised at the same time. Anything outside the fragment must be
refused with a REPL error object (an `error` verdict), never decided.
"""

from __future__ import annotations

import pytest

from verifiers.base import Status
from verifiers.lean.testing.checker import OutsideFragment, evaluate, parse_claim
from verifiers.lean.testing.engine import StandinLean
from verifiers.lean.verdict import LeanOutcome, first_error, lean_verdict, parse_command_response

HEADER = "import Mathlib\n\nset_option maxHeartbeats 400000\n\nopen Real"


def run(body: str, version: str = "4.19") -> tuple[dict, LeanOutcome]:
    lean = StandinLean(version)
    env = lean.command(HEADER)["env"]
    answer = lean.command(body, env)
    return answer, parse_command_response(answer)


TRUTH = [
    ("(7 : ℕ) - 10 = 0", True),  # ℕ subtraction truncates
    ("(7 : ℕ) - 10 = -3", None),  # no Neg ℕ: refused rather than guessed
    ("(7 : ℤ) - 10 = -3", True),
    ("(7 : ℕ) / 2 = 3", True),
    ("(7 : ℚ) / 2 = 3.5", True),
    ("(7 : ℝ) / 2 = 7 / 2", True),
    ("(-7 : ℤ) / 2 = -4", True),  # Euclidean: -7 = 2 * -4 + 1
    ("(7 : ℤ) / -2 = -3", True),  # Euclidean, not floor (floor would be -4)
    ("(-7 : ℤ) % 2 = 1", True),
    ("(7 : ℤ) % -2 = 1", True),
    ("(5 : ℕ) % 0 = 5", True),
    ("(1 : ℚ) / 0 = 0", True),
    ("(1 : ℝ) / 0 = 0", True),
    ("(5 : ℕ) / 0 = 0", True),
    ("2 ^ 10 = 1024", True),
    ("-2 ^ 2 = (-4 : ℤ)", True),  # prefix minus binds looser than ^
    ("(48 : ℚ) + 12 = 60", True),
    ("(48 : ℚ) + 12 = 61", False),
    ("(0.1 : ℝ) + 0.2 = 0.3", True),  # exact, unlike floating point
    ("(3 : ℚ) / 4 < 1", True),
    ("(3 : ℚ) / 4 ≥ 1", False),
    ("(2 : ℕ) + 3 * 4 = 14", True),
    ("((2 : ℕ) + 3) * 4 = 20", True),
    ("(2 : ℤ) ≠ 3", True),
]


@pytest.mark.parametrize("claim,truth", TRUTH)
def test_norm_num_decides_closed_claims_like_lean(claim: str, truth: bool | None) -> None:
    answer, outcome = run(f"theorem t : {claim} := by\n  norm_num")
    if truth is None:
        assert "outside the stand-in's fragment" in answer["message"]
        assert lean_verdict(outcome, verifier="x", version="1").status is Status.ERROR
        return
    assert outcome.status is (Status.VALID if truth else Status.INVALID), answer


def test_evaluation_and_parsing_edges() -> None:
    assert evaluate(parse_claim("(7 : ℤ) / -2 = 0").left, "ℤ") == -3
    with pytest.raises(OutsideFragment):
        parse_claim("(2 : ℕ) + (3 : ℤ) = 5")  # mixed types need Lean's coercions
    with pytest.raises(OutsideFragment):
        parse_claim("(2.5 : ℕ) = 2")
    with pytest.raises(OutsideFragment):
        parse_claim("x + 1 = 2")
    with pytest.raises(OutsideFragment):
        parse_claim("Real.sqrt 4 = 2")


def test_have_failure_is_reported_at_its_step_and_recovered_from() -> None:
    body = ("theorem t : (48 : ℚ) + 12 = 60 := by\n"
            "  have h₁ : (48 : ℚ) + 12 = 61 := by norm_num\n"
            "  have h₂ : (61 : ℚ) * 2 = 122 := by norm_num\n"
            "  linarith")
    answer, outcome = run(body)
    assert outcome.status is Status.INVALID
    assert [m.pos.line for m in outcome.errors] == [2]  # only the wrong step; h₁ is still in scope after it
    assert outcome.errors[0].pos.column == body.splitlines()[1].index("norm_num")
    assert first_error(outcome).line == 2


def test_linarith_uses_closed_hypotheses_in_scope() -> None:
    # A false hypothesis makes linarith prove anything, as in Lean.
    _, ok = run("theorem t (h : (2 : ℚ) + 2 = 5) : (1 : ℚ) = 2 := by\n  linarith")
    assert ok.status is Status.VALID
    _, bad = run("theorem t (h : (2 : ℚ) + 2 = 4) : (1 : ℚ) = 2 := by\n  linarith")
    assert bad.status is Status.INVALID and "linarith failed" in bad.errors[0].data


def test_exact_needs_the_same_statement() -> None:
    _, ok = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  have h : (2 : ℕ) + 2 = 4 := by decide\n  exact h")
    assert ok.status is Status.VALID
    _, bad = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  have h : (2 : ℕ) + 3 = 5 := by decide\n  exact h")
    assert bad.status is Status.INVALID and bad.errors[0].data.startswith("type mismatch")
    # Different values can never be definitionally equal, whatever the type; equal values written
    # differently are decided only over ℕ (where Lean's defeq folds ground arithmetic).
    _, q_bad = run("theorem t : (2 : ℚ) + 2 = 4 := by\n  have h : (2 : ℚ) + 2 = 5 := by norm_num\n  exact h")
    assert [m.data.split("\n")[0] for m in q_bad.errors] == ["norm_num failed to prove the goal: it simplifies to "
                                                              "False", "type mismatch"]
    _, nat_defeq = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  have h : (1 : ℕ) + 3 = 4 := by decide\n  exact h")
    assert nat_defeq.status is Status.VALID
    answer, _ = run("theorem t : (2 : ℚ) + 2 = 4 := by\n  have h : (1 : ℚ) + 3 = 4 := by norm_num\n  exact h")
    assert "outside the stand-in's fragment" in answer["message"]
    _, unknown = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  exact nope")
    assert "unknown identifier 'nope'" in unknown.errors[0].data


def test_unsolved_goals_and_extra_tactics() -> None:
    _, unsolved = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  have h : (1 : ℕ) = 1 := by rfl")
    assert unsolved.status is Status.INVALID
    assert unsolved.errors[0].data.startswith("unsolved goals")
    assert first_error(unsolved) is None  # "unsolved goals" does not locate a wrong step
    _, extra = run("theorem t : (2 : ℕ) + 2 = 4 := by\n  decide\n  decide")
    assert extra.errors[0].data == "no goals to be proved" and extra.errors[0].pos.line == 3


@pytest.mark.parametrize("version,quote", [("4.27", "'sorry'"), ("4.28", "`sorry`")])
def test_sorry_is_never_valid_in_either_quoting(version: str, quote: str) -> None:
    answer, outcome = run("theorem t : (2 : ℝ) + 2 = 4 := by\n  sorry", version)
    assert answer["messages"][0]["data"] == f"declaration uses {quote}"
    assert answer["sorries"][0]["goal"] == "⊢ 2 + 2 = 4"
    assert outcome.status is Status.INVALID
    # Either alone makes a proof invalid: the warning without `sorries`, or `sorries` without the warning.
    warning_only = parse_command_response({"env": 1, "messages": answer["messages"]})
    sorries_only = parse_command_response({"env": 1, "sorries": answer["sorries"]})
    assert warning_only.status is Status.INVALID and sorries_only.status is Status.INVALID


def test_statements_with_variables_are_decided_only_for_sorry() -> None:
    stmt = "theorem s (x : ℝ) (h₀ : x + 1 = 3) : x = 2 := by"
    answer, outcome = run(stmt + "\n  sorry")
    assert outcome.status is Status.INVALID and answer["sorries"][0]["goal"].endswith("⊢ x = 2")
    answer, outcome = run(stmt + "\n  linarith")
    assert outcome.status is Status.ERROR and "outside the stand-in's fragment" in answer["message"]


@pytest.mark.parametrize("body", [
    "theorem t : (2 : ℝ) + 2 = 4 := by\n  nlinarith",
    "theorem t : (2 : ℝ) + 2 = 4 := by\n  simp",  # simp on ℝ: not decided by the stand-in
    "theorem t : (2 : ℝ) + 2 = 4 := by\n  decide",
    "theorem t : (2 : ℚ) + 2 = 4 := by\n  rfl",
    "theorem t : (2 : ℕ) + 2 = 4 := by\n  norm_num; rfl",
    "def f : ℕ := 2",
    "theorem t : (2 : ℕ) + 2 = 4 := rfl",
])
def test_outside_the_fragment_is_an_error_never_a_verdict(body: str) -> None:
    answer, outcome = run(body)
    assert "outside the stand-in's fragment" in answer["message"]
    assert not answer["message"].startswith("Lean error:")
    assert outcome.status is Status.ERROR


def test_verdict_rules() -> None:
    msg = {"severity": "error", "pos": {"line": 3, "column": 2}, "endPos": {"line": 3, "column": 9}, "data": "x"}
    unsolved = {"severity": "error", "pos": {"line": 1, "column": 30}, "data": "unsolved goals\n⊢ False"}
    info = {"severity": "info", "pos": {"line": 2, "column": 0}, "data": "Try this: rfl"}
    assert parse_command_response({"env": 0}).status is Status.VALID
    assert parse_command_response({"env": 0, "messages": [info]}).status is Status.VALID
    o = parse_command_response({"env": 0, "messages": [unsolved, msg]})
    assert o.status is Status.INVALID and first_error(o).line == 3
    o = parse_command_response({"env": 0, "messages": [msg], "sorries": [{"pos": {"line": 2, "column": 4},
                                                                          "goal": "⊢ 1 = 1", "proofState": 0}]})
    assert first_error(o).line == 2  # a sorry before the error is the first problem
    assert parse_command_response({"message": "Unknown environment."}).status is Status.ERROR
    assert parse_command_response({"env": 0, "messages": [{"severity": "error"}]}).status is Status.ERROR
    assert parse_command_response([1, 2]).status is Status.ERROR
    assert LeanOutcome(error="x", timed_out=True).status is Status.TIMEOUT
