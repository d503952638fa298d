"""The outcome verifier against real model solutions with OpenAI's correctness labels."""

from __future__ import annotations

import asyncio
import json

import pytest

from tasks.sources.answers import parse_gsm8k_answer
from verifiers.base import OutcomeItem, Status
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig, check, extract_answer

from conftest import FIXTURES

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def _run(verifier, items):
    async def go():
        try:
            return await verifier.verify(items)
        finally:
            await verifier.aclose()

    return asyncio.run(go())


def test_agrees_with_is_correct_on_all_5276_gsm8k_model_solutions():
    solutions = [json.loads(line) for line in (FIXTURES / "gsm8k" / "example_model_solutions.jsonl").open()]
    problems = [json.loads(line) for line in (FIXTURES / "gsm8k" / "test.jsonl").open()]
    items, labels = [], []
    for sol, prob in zip(solutions, problems, strict=True):
        assert sol["question"] == prob["question"]
        gold, _ = parse_gsm8k_answer(prob["answer"])
        for model in MODELS:
            items.append(OutcomeItem(sol[model]["solution"], gold))
            labels.append(sol[model]["is_correct"])
    verdicts = _run(OutcomeVerifier(), items)
    assert len(verdicts) == len(items) == 5276
    agree = sum((v.status is Status.VALID) == label for v, label in zip(verdicts, labels))
    assert agree / len(items) >= 0.999, f"agreement {agree}/{len(items)}"
    assert all(v.verifier == "outcome" and v.version for v in verdicts)
    assert sum(labels) > 1000, "the data holds both kinds"


def test_extraction_and_fast_path():
    assert extract_answer("so 3 + 4 = 7.\nA: 7") == "7"
    assert extract_answer("x = 12. The answer is 12.") == "12"
    assert extract_answer(r"hence \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_answer("#### 1,234") == "1,234"
    assert extract_answer("I made 3 then 4 then 18 dollars") == "18"
    assert extract_answer("no numbers here") is None
    assert check("$1,234.00", "1234") is True
    assert check("0.5", "1/2") is True
    assert check("18 dollars", "18") is True
    assert check("17", "18") is False
    assert check(r"\frac{1}{2}", "0.5") is None  # not for the fast path: Math-Verify decides


def test_math_verify_path_and_statuses():
    items = [
        OutcomeItem(r"The answer is \frac{1}{2}.", "0.5"),  # LaTeX vs number: Math-Verify
        OutcomeItem(r"\boxed{x^2+2x+1}", "(x+1)^2"),
        OutcomeItem(r"\boxed{x^2+1}", "(x+1)^2"),
        OutcomeItem("The answer is 3.", ""),  # no gold: cannot decide
        OutcomeItem("I give up.", "4"),  # no answer at all is a wrong solution, decided
    ]
    v = _run(OutcomeVerifier(OutcomeVerifierConfig(workers=1)), items)
    assert [x.status for x in v] == [Status.VALID, Status.VALID, Status.INVALID, Status.ERROR, Status.INVALID]
    assert "no gold" in v[3].detail


def test_a_stuck_or_crashing_check_is_timeout_or_error_never_wrong():
    import slow_checks

    item = [OutcomeItem(r"\boxed{\sqrt{2}}", r"2^{1/2}")]
    v = _run(OutcomeVerifier(OutcomeVerifierConfig(workers=1, timeout_s=0.5), slow_check=slow_checks.sleeps_forever), item)
    assert v[0].status is Status.TIMEOUT and not v[0].status.decided
    v = _run(OutcomeVerifier(OutcomeVerifierConfig(workers=1), slow_check=slow_checks.crashes), item)
    assert v[0].status is Status.ERROR and "parser exploded" in v[0].detail
    v = _run(OutcomeVerifier(OutcomeVerifierConfig(workers=1)), item)
    assert v[0].status is Status.VALID


def test_math_verify_off_leaves_symbolic_answers_undecided():
    v = _run(OutcomeVerifier(OutcomeVerifierConfig(use_math_verify=False)), [OutcomeItem(r"\boxed{\sqrt{4}}", "2")])
    assert v[0].status is Status.ERROR


def test_verdicts_carry_the_extracted_answer_apart_from_their_message():
    items = [OutcomeItem("3 + 4 = 7. The answer is 7.", "7"), OutcomeItem("so $1,234.", "1234"),
             OutcomeItem("The answer is 8.", ""), OutcomeItem("no numbers here", "7"),
             OutcomeItem(r"so \boxed{\frac{1}{2}}", r"\frac{1}{3}")]
    verdicts = _run(OutcomeVerifier(OutcomeVerifierConfig(use_math_verify=False)), items)
    assert [v.answer for v in verdicts] == ["7", "1,234", "8", None, r"\frac{1}{2}"]
    assert [v.status for v in verdicts] == [Status.VALID, Status.VALID, Status.ERROR, Status.INVALID, Status.ERROR]
    assert verdicts[2].detail == "no gold answer to compare with", "the message stays a message"
    assert set(verdicts[0].to_row()) == {"verifier", "version", "status", "score", "detail"}, "nodes.verdicts unchanged"
