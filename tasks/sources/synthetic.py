"""The built-in synthetic domain: multi-step arithmetic word problems with a ground-truth oracle.

A problem is a start quantity and a chain of 3–8 dependent operations. The question text is written
from fixed sentence templates so that anything holding only the text (the simulated policy, the
stand-in HTTP server, the oracle) can recover the exact chain. The oracle says, for any written steps,
which is the first error, so every label stepforge produces on this domain can be checked.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.problem import Problem
from tasks.sources.base import SourceResult

SOURCE = "synthetic-arith"

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kemal", "Lena",
          "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wen", "Yusuf"]
_UNITS = ["apples", "marbles", "stickers", "books", "coins", "stamps", "pencils", "shells", "cards", "beads"]

# One sentence template per operation; the policy and the oracle parse questions back with these.
_OP_SENTENCES = {
    "+": "Then {name} gets {x} more {unit}.",
    "-": "Then {name} gives away {x} {unit}.",
    "*": "Then the number of {unit} {name} has is multiplied by {x}.",
    "/": "Then {name} splits the {unit} into {x} equal piles and keeps one pile.",
}
_OP_WORDS = {"+": "gets {x} more", "-": "gives away {x}", "*": "multiplies by {x}", "/": "keeps one of {x} piles"}
_START_RE = re.compile(r"(?P<name>[A-Z][a-z]+) has (?P<a>\d+) (?P<unit>[a-z]+)\.")
_OP_RES = [
    ("+", re.compile(r"Then (?P<name>[A-Z][a-z]+) gets (?P<x>\d+) more [a-z]+\.")),
    ("-", re.compile(r"Then (?P<name>[A-Z][a-z]+) gives away (?P<x>\d+) [a-z]+\.")),
    ("*", re.compile(r"Then the number of [a-z]+ (?P<name>[A-Z][a-z]+) has is multiplied by (?P<x>\d+)\.")),
    ("/", re.compile(r"Then (?P<name>[A-Z][a-z]+) splits the [a-z]+ into (?P<x>\d+) equal piles and keeps one pile\.")),
]
_QUESTION_END_RE = re.compile(r"How many [a-z]+ does [A-Z][a-z]+ have at the end\?")
_NUM = r"-?\d+(?:\.\d+)?"
STEP_RE = re.compile(rf"(?P<a>{_NUM})\s*(?P<op>[-+*/×÷])\s*(?P<x>{_NUM})\s*=\s*(?P<c>{_NUM})")
_ANSWER_RE = re.compile(rf"The answer is:?\s*(?P<v>{_NUM})")


@dataclass(frozen=True)
class ArithSpec:
    """The exact chain behind a question: value_{i+1} = value_i (op_i) x_i."""

    name: str
    unit: str
    start: int
    ops: tuple[tuple[str, int], ...]

    @cached_property
    def value_chain(self) -> tuple[int, ...]:
        """The chain's values, computed once per spec (the simulated policy and the oracle read them for
        every sample and step; recomputing them with Fractions each time dominated the policy's CPU).
        A tuple, so the cached copy cannot be changed by a caller. (cached_property writes the instance
        dict directly, which a frozen dataclass allows; fields, equality and hashing are unchanged.)"""
        vals = [self.start]
        for op, x in self.ops:
            vals.append(int(apply_op(Fraction(vals[-1]), op, Fraction(x))))
        return tuple(vals)

    @property
    def values(self) -> list[int]:
        return list(self.value_chain)  # a fresh list: callers may do what they like with it

    @property
    def answer(self) -> int:
        return self.value_chain[-1]

    @cached_property
    def difficulty(self) -> float:
        """In [0, 1]: longer chains and larger numbers are harder."""
        length = (len(self.ops) - 3) / 5
        magnitude = min(1.0, math.log10(max(2, max(self.value_chain))) / 4)
        return max(0.0, min(1.0, 0.6 * length + 0.4 * magnitude))

    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.unit}."]
        parts += [_OP_SENTENCES[op].format(name=self.name, x=x, unit=self.unit) for op, x in self.ops]
        parts.append(f"How many {self.unit} does {self.name} have at the end?")
        return " ".join(parts)

    def reference_steps(self) -> list[str]:
        vals = self.value_chain
        return [render_step(self, i, Fraction(vals[i]), op, Fraction(x), Fraction(vals[i + 1]))
                for i, (op, x) in enumerate(self.ops)]


def apply_op(a: int | Fraction, op: str, x: int | Fraction) -> int | Fraction:
    """One step's arithmetic. Whole values may be ints (the simulated policy keeps them so while sampling:
    Fraction arithmetic on every step of every sample was most of its CPU); an int divided inexactly becomes
    a Fraction, so the value is the same either way (`fmt_num` and comparisons treat an int and an equal
    Fraction alike)."""
    if op == "+":
        return a + x
    if op == "-":
        return a - x
    if op == "*":
        return a * x
    if x == 0:
        return a  # never generated; guards a malformed step a policy might write
    if type(a) is int and type(x) is int:
        return a // x if a % x == 0 else Fraction(a, x)
    return a / x


def fmt_num(v: Fraction | int) -> str:
    if type(v) is int:  # the simulated policy keeps whole values as int
        return str(v)
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.2f}"


def render_step(spec: ArithSpec, index: int, a: Fraction, op: str, x: Fraction, c: Fraction) -> str:
    """Step `index` (0-based) computing c = a op x; the last step also states the answer."""
    verb = _OP_WORDS[op].format(x=fmt_num(x))
    text = f"{spec.name} {verb}: {fmt_num(a)} {op} {fmt_num(x)} = {fmt_num(c)}."
    if index == len(spec.ops) - 1:
        text += f" The answer is {fmt_num(c)}."
    return text


def parse_question(text: str) -> tuple[ArithSpec, int] | None:
    """The chain of the LAST question in `text` (prompts may hold few-shot examples before it), and the
    offset where that question ends; None if there is no synthetic question."""
    starts = list(_START_RE.finditer(text))
    if not starts:
        return None
    m0 = starts[-1]
    end_m = _QUESTION_END_RE.search(text, m0.end())
    if end_m is None:
        return None
    body = text[m0.end() : end_m.start()]
    ops: list[tuple[str, int]] = []
    for sentence in re.findall(r"Then [^.]*\.", body):
        for op, rx in _OP_RES:
            m = rx.fullmatch(sentence)
            if m:
                ops.append((op, int(m["x"])))
                break
        else:
            return None
    if not ops:
        return None
    return ArithSpec(m0["name"], m0["unit"], int(m0["a"]), tuple(ops)), end_m.end()


@dataclass(frozen=True)
class ParsedStep:
    a: Fraction
    op: str
    x: Fraction
    c: Fraction


def parse_step(text: str) -> ParsedStep | None:
    m = STEP_RE.search(text)
    if m is None:
        return None
    op = {"×": "*", "÷": "/"}.get(m["op"], m["op"])
    return ParsedStep(Fraction(m["a"]), op, Fraction(m["x"]), Fraction(m["c"]))


def step_is_correct(spec: ArithSpec, index: int, text: str) -> bool:
    """Whether step `index` does exactly the right operation on the right values with the right result."""
    if index >= len(spec.ops):
        return False
    p = parse_step(text)
    if p is None:
        return False
    op, x = spec.ops[index]
    vals = spec.value_chain
    return p.a == vals[index] and p.op == op and p.x == x and p.c == vals[index + 1]


def first_error(spec: ArithSpec, steps: Sequence[str]) -> int | None:
    """The oracle: 0-based index of the first wrong step, or None when every written step is correct.

    A solution that stops early with only correct steps has no error (it is incomplete, not wrong);
    a step past the end of the chain is an error.
    """
    for i, text in enumerate(steps):
        if not step_is_correct(spec, i, text):
            return i
    return None


def oracle_labels(spec: ArithSpec, steps: Sequence[str]) -> list[bool]:
    """Per-step ground truth: a step is good iff it comes before the first error."""
    fe = first_error(spec, steps)
    return [fe is None or i < fe for i in range(len(steps))]


def masked_error(spec: ArithSpec, steps: Sequence[str]) -> Literal["recovered", "lucky"] | None:
    """Why a wrong solution ends on the gold answer, if it does: ``recovered`` (a step after the first error
    is back on the question's chain, so the rest follows it to the answer) or ``lucky`` (the last step lands
    on the gold answer from a wrong value); None for a correct solution or one whose answer is wrong.

    These are exactly the solutions on which an outcome-based label (Monte Carlo rollouts, the answer check)
    calls a wrong step good: the oracle's `first_error` still finds the step."""
    fe = first_error(spec, steps)
    if fe is None or not steps or stated_answer(steps[-1]) != spec.answer:
        return None
    return "recovered" if any(step_is_correct(spec, j, steps[j]) for j in range(fe + 1, len(steps))) else "lucky"


def stated_answer(text: str) -> Fraction | None:
    m = _ANSWER_RE.search(text)
    return Fraction(m["v"]) if m else None


class SyntheticSourceConfig(BaseModel):
    """The embedded default source: synthetic multi-step arithmetic with a known oracle."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["synthetic"] = "synthetic"
    num_problems: int = Field(128, ge=1, description="How many problems to generate.")
    # Up to 64: long chains (16, 32 steps) are where OmegaPRM's binary search should pay off (label_quality.py
    # part 4). Difficulty, and with it the simulated policy's step error rate, saturates from 8 steps on.
    min_steps: int = Field(3, ge=1, le=64, description="Fewest operations in a problem.")
    max_steps: int = Field(8, ge=1, le=64, description="Most operations in a problem (up to 64: long chains).")
    seed: int = Field(0, description="Seed of the problem generator (independent of the build seed).")

    @model_validator(mode="after")
    def _check_range(self) -> "SyntheticSourceConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"`source.min_steps` ({self.min_steps}) must be <= `source.max_steps` ({self.max_steps})."
            )
        return self


def generate_spec(rng: random.Random, min_steps: int, max_steps: int) -> ArithSpec:
    n = rng.randint(min_steps, max_steps)
    value = rng.randint(5, 40)
    start = value
    ops: list[tuple[str, int]] = []
    for _ in range(n):
        choices = ["+", "*"]
        if value > 2:
            choices.append("-")
        divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 2]
        if divisors:
            choices.append("/")
        if value > 2000:  # keep numbers human-sized
            choices = [c for c in choices if c != "*"] or ["-"]
        op = rng.choice(choices)
        if op == "+":
            x = rng.randint(2, 30)
        elif op == "-":
            x = rng.randint(1, value - 1)
        elif op == "*":
            x = rng.randint(2, 6)
        else:
            x = rng.choice(divisors)
        ops.append((op, x))
        value = int(apply_op(Fraction(value), op, Fraction(x)))
    return ArithSpec(rng.choice(_NAMES), rng.choice(_UNITS), start, tuple(ops))


def load_synthetic(cfg: SyntheticSourceConfig) -> SourceResult:
    rng = random.Random(f"synthetic-arith/{cfg.seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    duplicates = 0
    while len(problems) < cfg.num_problems:
        spec = generate_spec(rng, cfg.min_steps, cfg.max_steps)
        q = spec.question()
        if q in seen:
            duplicates += 1
            continue
        seen.add(q)
        problems.append(Problem(
            source=SOURCE, question=q, answer=str(spec.answer), domain="math",
            metadata={"n_steps": len(spec.ops), "difficulty": round(spec.difficulty, 4),
                      "reference_steps": spec.reference_steps()},
        ))
    return SourceResult(problems=problems, quarantined=[], duplicates=duplicates)
