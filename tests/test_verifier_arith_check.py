"""The arithmetic step check: real GSM8K model solutions (right and wrong annotations, commas, `$`, `%`,
fractions, unparseable text) and the synthetic domain's three mistake kinds."""

from __future__ import annotations

import asyncio
import json
import random
from fractions import Fraction

import pytest

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.sources.synthetic import (ArithSpec, apply_op, first_error, generate_spec, parse_step, render_step)
from verifiers.arith_check import ArithCheck, ArithCheckConfig, check_step
from verifiers.base import Status, StepItem

from conftest import FIXTURES

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.fixture(scope="module")
def real_steps() -> list[str]:
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k" / "example_model_solutions.jsonl").open()]
    return [step for r in rows for m in (*MODELS, "ground_truth")
            for step in (r[m]["solution"] if m != "ground_truth" else r[m]).split("\n")]


# (a piece of a real step, expected status, what the case is about). Each piece is looked up in the real
# solutions, so the table cannot drift from the data.
REAL = [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.", Status.VALID, "annotation and inline chain"),
    ("she makes 13 * 2 = $<<13*2=26>>26", Status.VALID, "currency before the result"),
    ("4147200 * 4 = <<4147200*4=16588800>>16588000", Status.INVALID, "right annotation, wrong text after it"),
    ("he pays 15,000*$2 = $<<15000*2=30000>>3,000 per year", Status.INVALID, "thousands commas, wrong copy"),
    ("$4.20 + $9.45 + $1.35 = $<<4.20+9.45+1.35=14.999999999999998>>14.99.", Status.VALID,
     "calculator float and its truncation"),
    ("the cost was 3 * (2 + 150%) = $<<3*(2+150%)=8>>8.", Status.INVALID, "percent inside an annotation"),
    ("the boots cost x + 56 = $<<x+56=86>>86.", Status.ERROR, "a variable: cannot be checked"),
    ("then 2:15+2:38=<<2:15+2:38=8:40>>8:40 am", Status.ERROR, "times of day: cannot be parsed"),
    ("10 liters of orange drink is 10 * (2/3) = <<10*(2/3)=8>>8 liters of water.", Status.INVALID, "fraction"),
    ("The total amount Karan has to pay is $3,650 x 10/100 = $<<3,650*10/100=365>>365.", Status.VALID,
     "`x` as times, commas in an annotation"),
    ("Jana has 12*(2/3)=24 puppies.", Status.INVALID, "inline only, no annotation"),
    ("The jar is 45 cubic inches because 6 x 6 x 15 = <<6*6*15=540>>45", Status.INVALID, "`x` chain"),
    # Parsing bugs fixed in session 16 (h7), one row each, from real solutions:
    ("75 pounds + -31 pounds = <<75+-31=44>>44 pounds", Status.VALID, "a sign after an operator (was error)"),
    ("4*-5=<<4*-5=-20>>-20 people", Status.VALID, "times a negative number (was error)"),
    ("$8.5 / $.05/gumball = <<8.5/-.05=-170.0>>-170.0", Status.VALID, "divided by a negative decimal (was error)"),
    ("1.0 - -2 = <<1.0--2=3.0>>3.0", Status.VALID, "minus a negative number (was error)"),
    ("5*89 + 71*+92 + 100 + 86 = <<5*89+71*+92+100+86=7163>>7163", Status.VALID, "an explicit plus sign (was error)"),
    ("3.0 / -2 = 150%", Status.INVALID, "an inline chain with a signed operand is now read, and is wrong"),
    ("This means 12/1.3333... = <<12/1.3333...=10>>10 groups are needed.", Status.INVALID,
     "a repeating decimal is 4/3, so 12/(4/3) = 9, not 10 (was error)"),
    ("$1,500,000+$1,700,000=$<<1500000+1700000=3200000>>3,2 million", Status.VALID,
     "a decimal comma cuts the number: `3,2 million` is not 3 (was invalid)"),
    ("There are 3 * 0.8 = <<3*0.8=2.4000000000000004>>2.4 billion blue jellyfish", Status.VALID,
     "a scale word after the result: the left side may already be in billions"),
    ("A: 18", Status.NONE, "no equation"),
    ("the candle will be 8 centimeters shorter after burning from 1:00 to 5:00.", Status.NONE,
     "numbers and times without equations"),
]


@pytest.mark.parametrize("piece,expected,why", REAL, ids=[c[2] for c in REAL])
def test_real_gsm8k_steps(real_steps, piece, expected, why):
    step = next((s for s in real_steps if piece in s), None)
    assert step is not None, f"{piece!r} is not in the fixture's solutions"
    status, _ = check_step(step)
    assert status is expected, why


def test_unicode_fraction_and_rounded_results():
    assert check_step("The two remaining friends ate \u00be * 12 = <<\u00be*12=6.0>>6 slices.")[0] is Status.INVALID
    assert check_step("\u00be * 12 = 9")[0] is Status.VALID
    assert check_step("10 / 3 = 3.33")[0] is Status.VALID
    assert check_step("10 / 3 = 3.32")[0] is Status.INVALID
    assert check_step("11 / 5 = <<11/5=2.2>>2 trays")[0] is Status.INVALID  # whole-number rounding is off by default
    assert check_step("11 / 5 = <<11/5=2.2>>2 trays", ArithCheckConfig(integer_rounding=True))[0] is Status.VALID
    assert check_step("100/1000 * 100 = 10.0% more")[0] is Status.VALID  # `%` as written or as /100
    assert check_step("5 + 3 = 8 - 2 = 6")[0] is Status.VALID  # a running computation
    assert check_step("5 + 3 = 9 - 2 = 7")[0] is Status.INVALID
    assert check_step("12 × $2.50 = $30 and 30 ÷ 4 = 7.5")[0] is Status.VALID


def test_prose_that_is_not_an_equation_is_skipped():
    for text in ["3 apples * 2 = 7 apples", "1/2 of 10 = 5", "so 2x = 10", "Step 2 = 6", "3/4 of 12 = 8"]:
        assert check_step(text)[0] is Status.NONE, text


def test_garbage_never_raises():
    rng = random.Random(0)
    alphabet = "0123456789+-*/=()%$,.x<> ab\u00be^"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        v = ArithCheck().check(text)
        assert v.status in set(Status) and v.verifier == "arith-check"
    assert ArithCheck().check("<<2^99999=1>>").status is Status.ERROR  # huge exponent refused, not computed
    assert ArithCheck().check("1/0 = 5").status is Status.ERROR


def test_verify_batch_and_verdict_fields():
    verdicts = asyncio.run(ArithCheck().verify([StepItem("2 + 2 = 4"), StepItem("2 + 2 = 5"), StepItem("hi")]))
    assert [v.status for v in verdicts] == [Status.VALID, Status.INVALID, Status.NONE]
    assert [v.score for v in verdicts] == [1.0, 0.0, None]
    assert "left side is 4" in verdicts[1].detail
    assert verdicts[0].version.startswith("1+sympy-")


def _mistake(spec: ArithSpec, i: int, kind: str) -> str:
    vals = spec.value_chain
    op, x = spec.ops[i]
    a = Fraction(vals[i])
    if kind == "wrong_result":
        return render_step(spec, i, a, op, Fraction(x), Fraction(vals[i + 1]) + 2)
    if kind == "wrong_operand":
        return render_step(spec, i, a, op, Fraction(x + 1), apply_op(a, op, Fraction(x + 1)))
    other = {"+": "-", "-": "+", "*": "+", "/": "*"}[op]
    return render_step(spec, i, a, other, Fraction(x), apply_op(a, other, Fraction(x)))


def test_synthetic_mistake_kinds():
    """A wrong result is caught; a wrong operand or operation computed correctly is not (a semantic slip)."""
    rng = random.Random(1)
    check = ArithCheck()
    for _ in range(50):
        spec = generate_spec(rng, 3, 8)
        for i, step in enumerate(spec.reference_steps()):
            assert check.check(step).status is Status.VALID, step
        i = rng.randrange(len(spec.ops))
        assert check.check(_mistake(spec, i, "wrong_result")).status is Status.INVALID
        assert check.check(_mistake(spec, i, "wrong_operand")).status is Status.VALID
        assert check.check(_mistake(spec, i, "wrong_operation")).status is Status.VALID


def test_simulated_policy_first_errors_caught_exactly_when_the_result_is_wrong():
    """On the simulated policy's own text, the check flags the oracle's first wrong step exactly when that
    step's stated result does not follow from its own operands."""
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.5))
    check = ArithCheck()
    rng = random.Random(2)
    caught = missed = 0
    for n in range(200):
        spec = generate_spec(rng, 3, 8)
        text = policy.sample(spec.question() + "\n", seed=n, index=0).text
        steps = [s.split(": ", 1)[1] for s in text.strip().split("\n")]
        fe = first_error(spec, steps)
        for i in range(fe if fe is not None else len(steps)):
            assert check.check(steps[i]).status is Status.VALID
        if fe is None:
            continue
        p = parse_step(steps[fe])
        # Values past a wrong operand may be fractions the policy writes rounded to 2 decimals.
        slip = abs(apply_op(p.a, p.op, p.x) - p.c) > Fraction(1, 100)
        assert (check.check(steps[fe]).status is Status.INVALID) == slip, steps[fe]
        caught += slip
        missed += not slip
    assert caught > 20 and missed > 20, "both kinds occur"


@pytest.mark.parametrize("text,expected,why", [
    ("1,500,000 + 1,700,000 = 3.2 million", Status.VALID, "the left side in units, the result in millions"),
    ("1,500,000 + 1,700,000 = 4.2 million", Status.INVALID, "wrong in either unit"),
    ("3 * 0.8 = 2.4 billion", Status.VALID, "both sides in billions"),
    ("2 + 2 = 4.5 million", Status.INVALID, "4 is neither 4.5 nor 4,500,000"),
    ("33.33... * 3 = 100", Status.VALID, "33.33... is 100/3"),
    ("100% / 33.33...% = 3", Status.VALID, "a repeating percentage"),
    ("so 5 + 3 = 8...", Status.VALID, "an ellipsis after a whole number is punctuation"),
    ("so 5 + 3 = 9...", Status.INVALID, "and the equation before it is still checked"),
    ("2.4... + 1 = 3.4", Status.NONE, "`2.4...` (no repeating digits) is an approximation: not checked"),
    ("0,5 + 1 = 1,5", Status.NONE, "decimal commas: the run is cut out of longer numbers"),
    ("10/3 ≈ 3.33", Status.VALID, "≈ to the digits shown"),
    ("10/3 ≈ 3", Status.VALID, "≈ a whole number"),
    ("1000/3 ≈ 330", Status.VALID, "≈ within 1 %"),
    ("10/3 ≈ 5", Status.INVALID, "≈ far off"),
    ("<<2^-3=0.125>>", Status.VALID, "a negative exponent"),
    ("<<2^(9^99)=1>>", Status.ERROR, "an exponent that is an expression is refused, not computed"),
    ("<<2^-99999=0>>", Status.ERROR, "a huge negative exponent is refused too"),
    ("<<1+--2=3>>", Status.ERROR, "two signs in a row"),
])
def test_parsing_fixes(text, expected, why):
    assert check_step(text)[0] is expected, why
