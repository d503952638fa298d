"""A simulated author for the MUSTARD-style flow: a policy backend that answers the `mustard-author` and
`mustard-revise` prompts the way an LLM prover does, with mistakes whose kinds and rate are known.

It reads only the prompt text, so it answers the same in-process and behind the stand-in OpenAI server
(`stepforge serve-policy --author-model NAME`). Given a concept it knows (matched by keywords: whole-number
arithmetic, remainders, order of operations, decimals, negative integers, fractions, percentages, ratios,
means, exponents, percentage changes, linear equations, Pythagorean triples, compound interest, arithmetic
series, modular arithmetic) it draws a problem, writes an informal proof, and writes a Lean 4 + Mathlib
proof in the stand-in checker's fragment, one `have hᵢ : <closed claim> := by norm_num` per step, closed by
`exact hₙ` (or `norm_num` where the goal is no single step). The text is real Lean a user can check with
real Lean. Known mistakes, each with probability `mistake_rate` per formal step:

- `wrong_value`: a `have` states a wrong value (an arithmetic slip): `norm_num` fails on that line;
- `sorry_step`: a `have` is left as `by sorry`: the proof uses sorry;
- `wrong_name`: the closing `exact` names the wrong hypothesis: a type mismatch or unknown identifier.

The informal proof is always right: the mistakes are the formalisation's. Shown Lean's messages in a
revise prompt, the author fixes each line a message names with probability `fix_rate` (recomputing the
`have`'s value from its own expression, proving it by `norm_num`, or closing with the hypothesis whose
claim is the goal) and copies every other line as it was. A concept it does not know gets an answer
without a formal proof (a malformed answer). Deterministic given (seed, prompt, sample index).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.mustard.texts import FEEDBACK_LINE_RE, FEEDBACK_MARK, PREVIOUS_MARK, Answer, MalformedAnswer, parse_answer, render_answer
from tasks.policy.simulated_base import TextAnswerBackend, tagged_rng

KIND = "simulated-author"
ERROR_KINDS = ("wrong_value", "sorry_step", "wrong_name")
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


class SimulatedAuthorConfig(BaseModel):
    """A stand-in author model for the MUSTARD-style flow (use a real model via `openai` etc. elsewhere)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["simulated-author"] = "simulated-author"
    mistake_rate: float = Field(0.2, ge=0.0, le=1.0, description="Probability of a mistake per formal step (a "
                                "wrong `have` value or a `sorry`) and at the closing `exact` (a wrong name).")
    fix_rate: float = Field(0.8, ge=0.0, le=1.0, description="Probability that the author fixes a line Lean's "
                            "messages name when it revises (1: every named mistake is fixed in one revision).")
    latency_s: float = Field(0.0, ge=0.0, description="Simulated seconds per request.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once (matters with latency).")
    max_batch: int = Field(256, ge=1, description="Requests the caller may hand over in one call.")


def policy_id(cfg: SimulatedAuthorConfig) -> str:
    return f"{KIND}/v1/mistakes={cfg.mistake_rate}/fix={cfg.fix_rate}"


# --- values as Lean and as prose -------------------------------------------------------------------------


def _terminating(v: Fraction) -> bool:
    d = v.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _decimal(v: Fraction) -> str:
    """A terminating fraction as a decimal numeral (`8.75`)."""
    sign = "-" if v < 0 else ""
    v = abs(v)
    places = 0
    while (v * 10**places).denominator != 1:
        places += 1
    if places == 0:
        return f"{sign}{v.numerator}"
    digits = str((v * 10**places).numerator).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def lean_value(v: Fraction, typ: str) -> str:
    """How the author writes a value on the right of a claim of type `typ`."""
    if typ == "ℝ" and _terminating(v):
        return _decimal(v)
    if v.denominator == 1:
        return str(v.numerator)
    return f"{v.numerator} / {v.denominator}"


def prose(v: Fraction, typ: str = "ℚ") -> str:
    if typ == "ℝ" and _terminating(v):
        return _decimal(v)
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _lit(x: int | Fraction | str, typ: str) -> str:
    return f"({x} : {typ})"


# --- evaluating the author's own claims (what it recomputes when it revises) ---------------------------

_TOKEN_RE = re.compile(r"\s*(?:(\d+\.\d+|\d+)|(ℕ|ℤ|ℚ|ℝ)|([-+*/%^():]))")


def evaluate(text: str) -> tuple[Fraction, str]:
    """Value and type of a closed term the author writes (numerals, decimals, + - * / % ^, parentheses, one
    ascription), with Lean's ℕ/ℤ semantics for `-`, `/` and `%`. Raises ValueError on anything else."""
    tokens: list[str] = []
    pos = 0
    typ = "ℕ"
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot read {text[pos:]!r}")
        tok = next(g for g in m.groups() if g is not None)
        if tok in ("ℕ", "ℤ", "ℚ", "ℝ"):
            typ = tok
        tokens.append(tok)
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        i += 1
        return tokens[i - 1]

    def binop(op: str, a: Fraction, b: Fraction) -> Fraction:
        if op == "+":
            return a + b
        if op == "-":
            return max(a - b, Fraction(0)) if typ == "ℕ" else a - b
        if op == "*":
            return a * b
        if op == "^":
            return a ** int(b)
        if b == 0:
            return Fraction(0) if op == "/" else a
        if op == "/":
            return Fraction(math.floor(a / b)) if typ in ("ℕ", "ℤ") else a / b
        return a - b * math.floor(a / b)  # % (Euclidean for the positive divisors the author writes)

    def atom() -> Fraction:
        tok = take()
        if tok == "(":
            v = expr(0)
            if peek() == ":":
                take()
                take()  # the type
            if take() != ")":
                raise ValueError("unbalanced parentheses")
            return v
        if tok == "-":
            return -atom()
        return Fraction(tok)

    prec = {"+": 65, "-": 65, "*": 70, "/": 70, "%": 70, "^": 75}

    def expr(min_prec: int) -> Fraction:
        left = atom()
        while (op := peek()) in prec and prec[op] >= min_prec:
            take()
            right = expr(prec[op] if op == "^" else prec[op] + 1)
            left = binop(op, left, right)
        return left

    value = expr(0)
    if i != len(tokens):
        raise ValueError(f"cannot read {text!r}")
    return value, typ


# --- problem families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    """A problem with its proof plan: the theorem `goal` over `typ`, one `have` per step (claim left side,
    value, optional right-hand text), closed by `exact` on the last step or by `norm_num`."""

    problem: str
    informal: str
    typ: str
    goal: str
    steps: tuple[tuple[str, Fraction, str | None], ...]
    close: Literal["exact", "norm_num"] = "exact"


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Femi", "Gus", "Hana", "Ivan", "Jia")


def _chain(rng: random.Random) -> Draft:
    a = rng.randint(20, 90)
    name = rng.choice(_NAMES)
    ops = []
    v = a
    for j in range(3):
        if j % 2 == 0 or v <= 8:
            x = rng.randint(3, 30)
            ops.append(("+", x))
            v += x
        else:
            x = rng.randint(2, v - 5)
            ops.append(("-", x))
            v -= x
    lhs = _lit(a, "ℕ")
    steps = []
    words = []
    cur = a
    for op, x in ops:
        lhs = f"{lhs} {op} {x}"
        cur = cur + x if op == "+" else cur - x
        steps.append((lhs, Fraction(cur), None))
        words.append(f"{'receives' if op == '+' else 'gives away'} {x}")
    problem = (f"{name} has {a} marbles, then {words[0]}, {words[1]} and {words[2]} marbles. "
               f"Prove that {name} ends with {v} marbles.")
    informal = " ".join(f"After step {k + 1} {name} has {int(s[1])} marbles." for k, s in enumerate(steps))
    informal += f" Hence {name} ends with {v} marbles."
    return Draft(problem, informal, "ℕ", f"{lhs} = {v}", tuple(steps))


def _multiply(rng: random.Random) -> Draft:
    a, b, c = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 9)
    p, v = a * b, a * b + c
    return Draft(f"A shop packs {a} boxes of {b} pencils and keeps {c} loose pencils. Prove that it has {v} pencils.",
                 f"The boxes hold {a} × {b} = {p} pencils; with the {c} loose ones that is {p} + {c} = {v}.",
                 "ℕ", f"{_lit(a, 'ℕ')} * {b} + {c} = {v}",
                 ((f"{_lit(a, 'ℕ')} * {b}", Fraction(p), None), (f"{_lit(a, 'ℕ')} * {b} + {c}", Fraction(v), None)))


def _remainder(rng: random.Random) -> Draft:
    b = rng.randint(3, 9)
    a = rng.randint(3 * b, 12 * b) + rng.randint(1, b - 1)
    q, r = divmod(a, b)
    return Draft(f"{a} stickers are shared equally among {b} children, each getting as many as possible. Prove "
                 f"that {r} stickers are left over.",
                 f"Each child gets {a} ÷ {b} = {q} stickers, since {b} × {q} = {b * q} ≤ {a} < {b * (q + 1)}; "
                 f"the {b * q} stickers given out leave {a} − {b * q} = {r}.",
                 "ℕ", f"{_lit(a, 'ℕ')} % {b} = {r}",
                 ((f"{_lit(a, 'ℕ')} / {b}", Fraction(q), None), (f"{_lit(a, 'ℕ')} % {b}", Fraction(r), None)))


def _order_ops(rng: random.Random) -> Draft:
    a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, a + b * c - 1)
    v = a + b * c - d
    return Draft(f"Prove that {a} + {b} × {c} − {d} = {v}.",
                 f"Multiplication comes first: {b} × {c} = {b * c}. Then {a} + {b * c} = {a + b * c}, and "
                 f"{a + b * c} − {d} = {v}.",
                 "ℕ", f"{_lit(a, 'ℕ')} + {b} * {c} - {d} = {v}",
                 ((f"{_lit(b, 'ℕ')} * {c}", Fraction(b * c), None),
                  (f"{_lit(a, 'ℕ')} + {b} * {c}", Fraction(a + b * c), None),
                  (f"{_lit(a, 'ℕ')} + {b} * {c} - {d}", Fraction(v), None)))


def _decimals(rng: random.Random) -> Draft:
    n = rng.randint(2, 6)
    p = Fraction(rng.randint(3, 19), 4)
    q = Fraction(rng.randint(5, 60), 20)
    total = n * p + q
    ps, qs = _decimal(p), _decimal(q)
    return Draft(f"{n} notebooks cost {ps} dollars each and a pen costs {qs} dollars. Prove that together they "
                 f"cost {_decimal(total)} dollars.",
                 f"The notebooks cost {n} × {ps} = {_decimal(n * p)} dollars; adding the pen gives "
                 f"{_decimal(n * p)} + {qs} = {_decimal(total)} dollars.",
                 "ℝ", f"{_lit(n, 'ℝ')} * {ps} + {qs} = {_decimal(total)}",
                 ((f"{_lit(n, 'ℝ')} * {ps}", n * p, None), (f"{_lit(n, 'ℝ')} * {ps} + {qs}", total, None)))


def _integers(rng: random.Random) -> Draft:
    t0 = -rng.randint(1, 15)
    d1, u, d2 = rng.randint(2, 12), rng.randint(5, 25), rng.randint(1, 9)
    lhs = _lit(t0, "ℤ")
    steps = []
    cur = t0
    for op, x in (("-", d1), ("+", u), ("-", d2)):
        lhs = f"{lhs} {op} {x}"
        cur = cur - x if op == "-" else cur + x
        steps.append((lhs, Fraction(cur), None))
    return Draft(f"The temperature is {t0} °C. It falls by {d1} degrees, rises by {u} and falls by {d2}. Prove that "
                 f"it ends at {cur} °C.",
                 f"{t0} − {d1} = {t0 - d1}; {t0 - d1} + {u} = {t0 - d1 + u}; {t0 - d1 + u} − {d2} = {cur}.",
                 "ℤ", f"{lhs} = {cur}", tuple(steps))


def _fraction_add(rng: random.Random) -> Draft:
    b, d = rng.choice([(b, d) for b in range(2, 10) for d in range(2, 10) if b != d and b % d and d % b])
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    lcm = b * d // math.gcd(b, d)
    s = Fraction(a, b) + Fraction(c, d)
    lhs = f"{_lit(a, 'ℚ')} / {b} + {c} / {d}"
    return Draft(f"Prove that {a}/{b} + {c}/{d} = {prose(s)}.",
                 f"Over the common denominator {lcm}: {a}/{b} = {a * lcm // b}/{lcm} and {c}/{d} = {c * lcm // d}/{lcm}, "
                 f"so the sum is {a * lcm // b + c * lcm // d}/{lcm} = {prose(s)}.",
                 "ℚ", f"{lhs} = {lean_value(s, 'ℚ')}",
                 ((f"{_lit(a, 'ℚ')} / {b}", Fraction(a, b), f"{a * lcm // b} / {lcm}"),
                  (f"{_lit(c, 'ℚ')} / {d}", Fraction(c, d), f"{c * lcm // d} / {lcm}"),
                  (lhs, s, None)))


def _fraction_mul(rng: random.Random) -> Draft:
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    s = Fraction(a, b) * Fraction(c, d)
    lhs = f"{_lit(a, 'ℚ')} / {b} * ({c} / {d})"
    return Draft(f"Prove that {a}/{b} of {c}/{d} of a cake is {prose(s)} of the cake.",
                 f"Multiply numerators and denominators: {a} × {c} = {a * c} and {b} × {d} = {b * d}, so the share is "
                 f"{a * c}/{b * d} = {prose(s)}.",
                 "ℚ", f"{lhs} = {lean_value(s, 'ℚ')}",
                 ((f"{_lit(a, 'ℚ')} * {c}", Fraction(a * c), None), (f"{_lit(b, 'ℚ')} * {d}", Fraction(b * d), None),
                  (lhs, s, None)))


def _percent_of(rng: random.Random) -> Draft:
    p = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75))
    n = rng.randint(2, 40) * 10
    v = Fraction(p, 100) * n
    return Draft(f"Prove that {p}% of {n} is {prose(v)}.",
                 f"{p}% is {p}/100 = {prose(Fraction(p, 100))}, and {prose(Fraction(p, 100))} × {n} = {prose(v)}.",
                 "ℚ", f"{_lit(p, 'ℚ')} / 100 * {n} = {lean_value(v, 'ℚ')}",
                 ((f"{_lit(p, 'ℚ')} / 100", Fraction(p, 100), None), (f"{_lit(p, 'ℚ')} / 100 * {n}", v, None)))


def _ratio(rng: random.Random) -> Draft:
    k, c, m = rng.randint(2, 12), rng.randint(3, 40), rng.randint(2, 15)
    unit, v = Fraction(c, k), Fraction(c, k) * m
    return Draft(f"{k} apples cost {c} dollars. Prove that {m} apples at the same rate cost {prose(v)} dollars.",
                 f"One apple costs {c}/{k} = {prose(unit)} dollars, so {m} apples cost {prose(unit)} × {m} = {prose(v)}.",
                 "ℚ", f"{_lit(c, 'ℚ')} / {k} * {m} = {lean_value(v, 'ℚ')}",
                 ((f"{_lit(c, 'ℚ')} / {k}", unit, None), (f"{_lit(c, 'ℚ')} / {k} * {m}", v, None)))


def _average(rng: random.Random) -> Draft:
    xs = [rng.randint(50, 100) for _ in range(rng.randint(3, 4))]
    s, n = sum(xs), len(xs)
    mean = Fraction(s, n)
    inner = f"{_lit(xs[0], 'ℚ')}" + "".join(f" + {x}" for x in xs[1:])
    return Draft(f"A student scores {', '.join(map(str, xs[:-1]))} and {xs[-1]} on {n} tests. Prove that the mean "
                 f"score is {prose(mean)}.",
                 f"The scores add up to {s}, and {s}/{n} = {prose(mean)}.",
                 "ℚ", f"({inner}) / {n} = {lean_value(mean, 'ℚ')}",
                 ((inner, Fraction(s), None), (f"({inner}) / {n}", mean, None)))


def _exponents(rng: random.Random) -> Draft:
    b, e, c = rng.randint(2, 5), rng.randint(2, 6), rng.randint(2, 9)
    return Draft(f"Prove that {b}^{e} × {c} = {b**e * c}.",
                 f"{b}^{e} = {b**e}, and {b**e} × {c} = {b**e * c}.",
                 "ℕ", f"{_lit(b, 'ℕ')} ^ {e} * {c} = {b**e * c}",
                 ((f"{_lit(b, 'ℕ')} ^ {e}", Fraction(b**e), None), (f"{_lit(b, 'ℕ')} ^ {e} * {c}", Fraction(b**e * c), None)))


def _percent_change(rng: random.Random) -> Draft:
    price = rng.randint(2, 20) * 20
    up, down = rng.choice((10, 20, 25, 50)), rng.choice((10, 20, 25, 40))
    mid = price * Fraction(100 + up, 100)
    end = mid * Fraction(100 - down, 100)
    first = f"{_lit(price, 'ℚ')} * (1 + {up} / 100)"
    return Draft(f"A price of {price} dollars rises by {up}% and then falls by {down}%. Prove that it ends at "
                 f"{prose(end)} dollars.",
                 f"After the rise the price is {price} × {prose(Fraction(100 + up, 100))} = {prose(mid)}; after the fall "
                 f"it is {prose(mid)} × {prose(Fraction(100 - down, 100))} = {prose(end)}.",
                 "ℚ", f"{first} * (1 - {down} / 100) = {lean_value(end, 'ℚ')}",
                 ((first, mid, None), (f"{first} * (1 - {down} / 100)", end, None)))


def _linear_check(rng: random.Random) -> Draft:
    a, s, b = rng.randint(2, 9), rng.randint(1, 12), rng.choice([v for v in range(-20, 21) if v])
    c = a * s + b
    sign = f"+ {b}" if b >= 0 else f"- {-b}"
    return Draft(f"Prove that x = {s} solves {a}x {sign} = {c}.",
                 f"Substituting, {a} × {s} = {a * s} and {a * s} {sign} = {c}.",
                 "ℤ", f"{_lit(a, 'ℤ')} * {s} {sign} = {c}",
                 ((f"{_lit(a, 'ℤ')} * {s}", Fraction(a * s), None), (f"{_lit(a, 'ℤ')} * {s} {sign}", Fraction(c), None)))


def _pythagoras(rng: random.Random) -> Draft:
    a, b, c = rng.choice(((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29)))
    k = rng.randint(1, 3)
    a, b, c = a * k, b * k, c * k
    return Draft(f"Prove that a triangle with sides {a}, {b} and {c} is right-angled, that is {a}² + {b}² = {c}².",
                 f"{a}² = {a * a}, {b}² = {b * b} and {c}² = {c * c}; indeed {a * a} + {b * b} = {c * c}.",
                 "ℕ", f"{_lit(a, 'ℕ')} ^ 2 + {b} ^ 2 = {c} ^ 2",
                 ((f"{_lit(a, 'ℕ')} ^ 2", Fraction(a * a), None), (f"{_lit(b, 'ℕ')} ^ 2", Fraction(b * b), None),
                  (f"{_lit(c, 'ℕ')} ^ 2", Fraction(c * c), None)), close="norm_num")


def _interest(rng: random.Random) -> Draft:
    p, r = rng.choice((500, 800, 1000, 2000, 4000)), rng.choice((2, 4, 5, 10))
    one = Fraction(100 + r, 100)
    end = p * one**2
    return Draft(f"{p} dollars earn {r}% interest a year, compounded yearly. Prove that after two years the balance "
                 f"is {prose(end)} dollars.",
                 f"Each year multiplies the balance by 1 + {r}/100 = {prose(one)}: after one year {prose(p * one)}, "
                 f"after two {prose(end)}.",
                 "ℚ", f"{_lit(p, 'ℚ')} * (1 + {r} / 100) ^ 2 = {lean_value(end, 'ℚ')}",
                 ((f"{_lit(1, 'ℚ')} + {r} / 100", one, None), (f"{_lit(p, 'ℚ')} * (1 + {r} / 100)", p * one, None),
                  (f"{_lit(p, 'ℚ')} * (1 + {r} / 100) ^ 2", end, None)))


def _arith_series(rng: random.Random) -> Draft:
    n = rng.randint(5, 9)
    s = n * (n + 1) // 2
    terms = f"{_lit(1, 'ℕ')}" + "".join(f" + {i}" for i in range(2, n + 1))
    return Draft(f"Prove that the sum of the first {n} positive integers is {s}.",
                 f"Pairing the first and last terms gives {n} × {n + 1} / 2 = {s} (Gauss); adding the terms one by "
                 f"one gives the same {s}.",
                 "ℕ", f"{terms} = {s}",
                 ((f"{_lit(n, 'ℕ')} * ({n} + 1) / 2", Fraction(s), None), (terms, Fraction(s), None)))


def _modular(rng: random.Random) -> Draft:
    a, k, m = rng.randint(2, 9), rng.randint(3, 6), rng.randint(5, 13)
    p = a**k
    return Draft(f"Prove that {a}^{k} leaves remainder {p % m} when divided by {m}.",
                 f"{a}^{k} = {p}, and {p} = {m} × {p // m} + {p % m}.",
                 "ℕ", f"{_lit(a, 'ℕ')} ^ {k} % {m} = {p % m}",
                 ((f"{_lit(a, 'ℕ')} ^ {k}", Fraction(p), None), (f"{_lit(a, 'ℕ')} ^ {k} % {m}", Fraction(p % m), None)))


# First match wins: more specific keywords first.
FAMILIES: tuple[tuple[str, str, Callable[[random.Random], Draft]], ...] = (
    ("percentage change", "percent_change", _percent_change),
    ("addition and subtraction", "chain", _chain),
    ("multiplication of whole", "multiply", _multiply),
    ("remainder", "remainder", _remainder),
    ("order of operations", "order_ops", _order_ops),
    ("decimal", "decimals", _decimals),
    ("negative integer", "integers", _integers),
    ("adding fractions", "fraction_add", _fraction_add),
    ("multiplying fractions", "fraction_mul", _fraction_mul),
    ("percentage", "percent_of", _percent_of),
    ("ratio", "ratio", _ratio),
    ("mean", "average", _average),
    ("exponent", "exponents", _exponents),
    ("linear equation", "linear_check", _linear_check),
    ("pythagorean", "pythagoras", _pythagoras),
    ("interest", "interest", _interest),
    ("arithmetic series", "arith_series", _arith_series),
    ("modular", "modular", _modular),
)


def family_of(concept: str) -> tuple[str, Callable[[random.Random], Draft]] | None:
    low = concept.lower()
    for keyword, name, make in FAMILIES:
        if keyword in low:
            return name, make
    return None


# --- writing and revising ----------------------------------------------------------------------------------


def _hyp(i: int) -> str:
    return f"h{i}".translate(_SUB)


def write_formal(draft: Draft, family: str, rng: random.Random, rate: float) -> str:
    """The Lean file for `draft`, with this sample's mistakes."""
    tag = f"{rng.getrandbits(24):06x}"
    lines = ["import Mathlib", "", f"theorem mustard_{family}_{tag} : {draft.goal} := by"]
    for i, (lhs, value, rhs) in enumerate(draft.steps, start=1):
        right = rhs if rhs is not None else lean_value(value, draft.typ)
        tactic = "norm_num"
        if rng.random() < rate:
            if rng.random() < 0.6:  # wrong_value: an arithmetic slip in the stated value
                slip = rng.choice((-2, -1, 1, 2, 10))
                if draft.typ == "ℕ" and value + slip < 0:
                    slip = -slip  # a negative ℕ literal would not elaborate: a different error than a slip
                right = lean_value(value + slip, draft.typ)
            else:  # sorry_step
                tactic = "sorry"
        lines.append(f"  have {_hyp(i)} : {lhs} = {right} := by {tactic}")
    n = len(draft.steps)
    if draft.close == "norm_num":
        lines.append("  norm_num")
    elif rng.random() < rate:  # wrong_name: an earlier hypothesis, or one never introduced
        lines.append(f"  exact {_hyp(n - 1) if n > 1 else 'h'}")
    else:
        lines.append(f"  exact {_hyp(n)}")
    return "\n".join(lines)


_HAVE_RE = re.compile(r"^(?P<indent>\s*)have (?P<name>\S+) : (?P<lhs>.+?) = (?P<rhs>.+?) := by (?P<tactic>.+)$")
_EXACT_RE = re.compile(r"^(?P<indent>\s*)exact (?P<name>\S+)\s*$")
_GOAL_RE = re.compile(r"^theorem \S+ : (?P<goal>.+?) := by\s*$")


def _fix_line(lines: list[str], index: int) -> None:
    """Rewrite line `index` of the Lean file (0-based) the way the author repairs what Lean named there."""
    line = lines[index]
    if (m := _HAVE_RE.match(line)) is not None:
        try:
            value, typ = evaluate(m.group("lhs"))
        except ValueError:
            return
        lines[index] = f"{m.group('indent')}have {m.group('name')} : {m.group('lhs')} = {lean_value(value, typ)} := by norm_num"
    elif (m := _EXACT_RE.match(line)) is not None:
        goal = next((g.group("goal") for g in map(_GOAL_RE.match, lines) if g), None)
        for other in lines:
            h = _HAVE_RE.match(other)
            if h is not None and goal is not None and f"{h.group('lhs')} = {h.group('rhs')}" == goal:
                lines[index] = f"{m.group('indent')}exact {h.group('name')}"
                return
        lines[index] = f"{m.group('indent')}norm_num"


def revise(previous: Answer, feedback: str, rng: random.Random, fix_rate: float) -> Answer:
    """The previous answer with each line Lean's messages name fixed with probability `fix_rate`."""
    lines = previous.formal.split("\n")
    named = sorted({int(m.group("line")) for m in FEEDBACK_LINE_RE.finditer(feedback) if m.group("kind") != "warning"})
    for line_no in named:
        if 1 <= line_no <= len(lines) and rng.random() < fix_rate:
            _fix_line(lines, line_no - 1)
    return Answer(previous.problem, previous.informal, "\n".join(lines))


_CONCEPT_RE = re.compile(r"^Concept: (?P<concept>.+)$", re.MULTILINE)


def author_answer(prompt: str, seed: int | None, index: int, mistake_rate: float, fix_rate: float) -> str:
    """The text of sample `index` for an author or revise prompt (pure)."""
    rng = tagged_rng("author", seed, prompt, index)
    if PREVIOUS_MARK in prompt and FEEDBACK_MARK in prompt:
        before, _, rest = prompt.partition(PREVIOUS_MARK)
        previous_text, _, feedback_text = rest.partition(FEEDBACK_MARK)
        try:
            previous = parse_answer(previous_text)
        except MalformedAnswer:
            return "I cannot find my previous answer in this prompt."
        return render_answer(revise(previous, feedback_text, rng, fix_rate))
    m = _CONCEPT_RE.search(prompt)
    found = family_of(m.group("concept")) if m else None
    if found is None:
        concept = m.group("concept").strip() if m else "this concept"
        return f"I do not know how to write a formal problem about {concept}."
    name, make = found
    draft = make(rng)
    formal = write_formal(draft, name, rng, mistake_rate)
    return render_answer(Answer(draft.problem, draft.informal, formal))


class SimulatedAuthor(TextAnswerBackend):
    """Policy-protocol backend serving `author_answer` (in-process; the stand-in server serves the same)."""

    mean_logprob = -0.2

    def __init__(self, config: SimulatedAuthorConfig | None = None) -> None:
        config = config or SimulatedAuthorConfig()
        super().__init__(config, policy_id(config))

    def answer(self, prompt: str, seed: int | None, index: int) -> str:
        return author_answer(prompt, seed, index, self.config.mistake_rate, self.config.fix_rate)
