"""Arithmetic step check: are the equations a step states true?

A step's equations are found in two places:

- calculator annotations, GSM8K style: `<<48/2=24>>` (the model asked a calculator; the text after `>>`
  repeats the result and is checked as part of the inline text);
- inline chains of numbers, operators and `=`: `16 - 3 - 4 = 9`, `12 × $2.50 = $30`, `3,650 * 10% = 365`,
  `5 + 3 = 8 - 2 = 6` (a running computation: each side may equal the next side or its leading number).

Each side is turned into a sanitised token stream (numbers without thousands separators or currency,
`%` as `/100`, `×`/`x`/`÷`/`^` as operators, unicode vulgar fractions as quotients) and parsed by SymPy's
parser into exact rationals; nothing else ever reaches the parser, and no Python `eval` of step text
happens here. A stated result is right when it equals the exact value, or equals it rounded to the
decimals it shows (`10/3 = 3.33`), or is a calculator's float rendering of it (`4.2+9.45 = 14.999999999999998`).

What it catches: computation slips (a wrong result). What it cannot catch: a wrong operand or a wrong
operation computed correctly (`12 + 5 = 17` where the problem needed `12 - 5`), or any semantic mistake.

Statuses: `invalid` if any equation is false; else `error` if an annotation could not be parsed (a
variable, a time of day, a unit inside it); else `valid` if at least one equation was checked; `none`
when the step states no equation. Inline text that is not a clean arithmetic chain is skipped, not an
error (prose holds many numbers that are not equations).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from verifiers.base import Status, StepItem, Verdict

NAME = "arith-check"

_TOKEN_RE = re.compile(
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"|(?P<frac>[\u00bc-\u00be\u2150-\u215e])"
    r"|(?P<pct>%)"
    r"|(?P<cur>[$\u20ac\u00a3])"
    r"|(?P<op>\*\*|[-+*/\u00d7\u00f7^\u2212\u22c5\u00b7])"
    r"|(?P<lp>\()"
    r"|(?P<rp>\))"
    r"|(?P<eq>[=\u2248\u2243\u2245])"  # `=`, and `≈` (also `≃`, `≅`): a rounded statement
    r"|(?P<ell>\.\.\.|\u2026)"  # after a number: a repeating decimal (`1.3333...`); else it ends the run
    r"|(?P<sp>\s+)"
    r"|(?P<word>[A-Za-z_]+)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
_OPS = {"x": "*", "X": "*", "\u00d7": "*", "\u22c5": "*", "\u00b7": "*", "\u00f7": "/", "^": "**", "\u2212": "-"}
_MATH_KINDS = {"num", "frac", "pct", "cur", "op", "lp", "rp", "eq", "sp"}
_APPROX = frozenset({"\u2248", "\u2243", "\u2245"})
# Scale words after a stated result: `= $3.2 million` states 3,200,000.
_SCALE_WORDS = {"thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
# `≈`: the stated side may be off by up to one unit of its last digit (`10/3 ≈ 3`, `≈ 3.3`) or by this share.
_APPROX_REL = Fraction(1, 100)
_MAX_DIGITS = 40  # numbers longer than this are not arithmetic a step would state
_MAX_EXPONENT = 64  # `2^99999` would make SymPy build a huge integer


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


class ArithCheckConfig(BaseModel):
    """How step equations are found and compared."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["arith-check"] = "arith-check"
    annotations: bool = Field(True, description="Check GSM8K calculator annotations (expr=result between double angle brackets).")
    inline: bool = Field(True, description="Check inline chains such as `3 × 4 = 12` in the step text.")
    integer_rounding: bool = Field(
        False, description="Accept a whole-number result that rounds a fractional value (`7/2 = 3` or `= 4`). "
        "Off: a whole-number result must be exact, since GSM8K-style slips often look like that.")
    float_rel_tol: float = Field(
        1e-9, ge=0.0, le=1e-3,
        description="Relative tolerance for results written with 6 or more decimals (a calculator's float "
        "output such as 14.999999999999998 for 15).")
    max_step_chars: int = Field(20_000, ge=1, description="Longer steps are `error` (not scanned).")


def _repeating(num: str) -> bool:
    """`1.3333`, `33.33`: a decimal whose last two digits repeat, which an ellipsis after it continues."""
    frac = num.split(".")[1] if "." in num else ""
    return len(frac) >= 2 and frac[-1] == frac[-2]


def _tokens(text: str) -> list[_Tok]:
    raw = [_Tok(m.lastgroup or "other", m.group()) for m in _TOKEN_RE.finditer(text)]
    # An ellipsis glued to a repeating decimal is part of the number (`12/1.3333...`); anywhere else (`= 8...`,
    # `2.4...`) it is punctuation, which ends a run as before.
    toks: list[_Tok] = []
    for t in raw:
        if t.kind == "ell":
            if toks and toks[-1].kind == "num" and _repeating(toks[-1].text):
                toks[-1] = _Tok("num", toks[-1].text + "...")
                continue
            t = _Tok("other", t.text)
        toks.append(t)
    # `x`/`X` between two quantities is a multiplication sign (`3 x 4`); anywhere else it is a word.
    sig = [i for i, t in enumerate(toks) if t.kind != "sp"]
    for j, i in enumerate(sig):
        t = toks[i]
        if t.kind == "word" and t.text in ("x", "X") and 0 < j < len(sig) - 1:
            before, after = toks[sig[j - 1]], toks[sig[j + 1]]
            if before.kind in ("num", "frac", "pct", "rp") and after.kind in ("num", "frac", "cur", "lp"):
                toks[i] = _Tok("op", t.text)
    return toks


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class _Side:
    sources: tuple[str, ...]  # sanitised SymPy source; two readings when `%` appears (x/100, or x as written)
    has_op: bool  # computes something (a leading sign does not count)
    literal: Fraction | None  # the value, when the side is one number as written (the stated result)
    decimals: int | None  # that number's decimals
    leading: Fraction | None  # the first number, when the side starts `number operator ...`
    float_noise: bool  # an operand carries 6+ decimals (a pasted calculator float): compare with tolerance
    percent: bool


def _side(side: Sequence[_Tok]) -> _Side:
    """A side of an equation as sanitised source for SymPy; raises _Malformed if it is not arithmetic."""
    out: list[str] = []  # `%` as /100
    raw: list[str] = []  # `%` dropped: models also write `10/100*100 = 10%` meaning ten
    nums: list[tuple[Fraction, int]] = []
    has_op = percent = False
    depth = 0
    prev = "start"
    exponent = False  # the next token is an exponent (after `**`, or after `**` and a sign)
    for t in side:
        if t.kind in ("sp", "cur"):
            continue
        if exponent and t.kind not in ("num", "op"):
            # `2^(9^99)` would make SymPy build a huge integer: an exponent is a number as written.
            raise _Malformed("exponent is not a number")
        if t.kind == "num":
            digits = t.text.replace(",", "")
            repeating = digits.endswith("...")
            digits = digits.removesuffix("...")
            if len(digits) > _MAX_DIGITS:
                raise _Malformed(f"number {t.text} too long")
            if prev in ("num", "frac", "rp", "pct"):
                raise _Malformed("two numbers without an operator")
            if exponent and Fraction(digits) > _MAX_EXPONENT:
                raise _Malformed(f"exponent {t.text} too large")
            digits = "0" + digits if digits.startswith(".") else digits
            places = len(digits.split(".")[1]) if "." in digits else 0
            value = Fraction(digits)
            if repeating:  # `1.3333...` is 4/3: the last digit repeats for ever
                value += Fraction(int(digits[-1]), 9 * 10**places)
                digits = f"({value.numerator}/{value.denominator})"
            out.append(digits)
            raw.append(digits)
            nums.append((value, places))
            prev = "num"
            exponent = False
        elif t.kind == "frac":
            if prev in ("num", "frac", "rp", "pct"):
                raise _Malformed("mixed number")  # `1½`: rare, and ambiguous with a product
            value = Fraction(unicodedata.numeric(t.text)).limit_denominator(100)
            out.append(f"({value.numerator}/{value.denominator})")
            raw.append(out[-1])
            nums.append((value, 0))
            prev = "frac"
        elif t.kind == "pct":
            if prev not in ("num", "frac", "rp"):
                raise _Malformed("% without a number")
            if prev == "rp":
                out.append("*(1/100)")
            else:  # `5%` is one quantity: `50*5%` is 50*(5/100), `2+150%` is 2+(150/100)
                out[-1] = f"({out[-1]}/100)"
            percent = True
            prev = "pct"
        elif t.kind == "op":
            op = _OPS.get(t.text, t.text)
            if prev in ("start", "lp") and op not in ("-", "+"):
                raise _Malformed(f"side starts with {t.text}")
            if prev in ("op", "**", "sign") and (op not in ("-", "+") or prev == "sign"):
                raise _Malformed("two operators in a row")
            out.append(op)
            raw.append(op)
            has_op = has_op or prev not in ("start", "lp")
            # A sign right after an operator (`75+-31`, `600*-7`, `8.5/-.05`) is the operand's own; SymPy reads
            # `a*-b` as a*(-b).
            exponent = op == "**" or (exponent and prev == "**")
            prev = "sign" if prev in ("op", "**") else ("**" if op == "**" else "op")
        elif t.kind == "lp":
            if prev in ("num", "frac", "rp", "pct"):
                raise _Malformed("implicit multiplication")
            depth += 1
            out.append("(")
            raw.append("(")
            prev = "lp"
        elif t.kind == "rp":
            depth -= 1
            if depth < 0 or prev in ("op", "**", "sign", "lp", "start"):
                raise _Malformed("unbalanced parenthesis")
            out.append(")")
            raw.append(")")
            prev = "rp"
        else:
            raise _Malformed(f"{t.text!r} is not arithmetic")
    if not nums:
        raise _Malformed("no number")
    if depth != 0 or prev in ("op", "**", "sign", "start"):
        raise _Malformed("incomplete expression")
    significant = [t for t in side if t.kind not in ("sp", "cur", "pct")]
    literal = decimals = None
    if len(significant) == 1 and significant[0].kind == "num":
        literal, decimals = nums[0]
    elif len(significant) == 2 and significant[0].text in ("-", "\u2212") and significant[1].kind == "num":
        literal, decimals = -nums[0][0], nums[0][1]
    leading = None
    if len(significant) >= 2 and significant[0].kind == "num" and significant[1].kind == "op":
        leading = nums[0][0]
    sources = ("".join(out), "".join(raw)) if percent else ("".join(out),)
    return _Side(sources, has_op, literal, decimals, leading, any(d >= 6 for _, d in nums), percent)


@lru_cache(maxsize=65536)
def _value(source: str) -> Fraction:
    """Exact value of a sanitised expression (digits, `.`, `+-*/`, `**`, parentheses only) via SymPy's parser."""
    from sympy import Float, Integer, Rational
    from sympy.parsing.sympy_parser import auto_number, parse_expr, rationalize

    # Only what the sanitiser emits reaches the parser; anything else is a bug, not step text.
    if not re.fullmatch(r"[0-9.+\-*/() ]+", source):
        raise _Malformed(f"unsanitised expression {source!r}")
    # auto_number wraps literals as Integer/Float, rationalize turns each Float into its exact decimal
    # Rational; the namespace holds nothing else.
    expr = parse_expr(source, local_dict={}, global_dict={"Integer": Integer, "Float": Float, "Rational": Rational},
                      transformations=(auto_number, rationalize), evaluate=True)
    if not expr.is_Rational:
        raise _Malformed(f"{source} is not a finite rational number ({expr})")
    return Fraction(int(expr.p), int(expr.q))


@dataclass(frozen=True)
class _Check:
    text: str
    ok: bool | None  # None: could not be decided
    why: str = ""


def _close(exact: Fraction, stated: Fraction, decimals: int | None, cfg: ArithCheckConfig,
           noisy: bool = False) -> bool:
    """Is `stated` (written with `decimals` decimals; None when it is computed too) right for `exact`?"""
    if exact == stated:
        return True
    diff = abs(exact - stated)
    # A calculator float pasted in (`14.999999999999998`, or an operand like `26.666666666666668`).
    if (noisy or (decimals or 0) >= 6) and diff <= Fraction(cfg.float_rel_tol) * max(1, abs(exact)):
        return True
    if decimals is None:  # both sides computed: only equality counts
        return False
    if decimals == 0:
        return cfg.integer_rounding and diff < 1
    # Rounded or truncated to the decimals shown: within one unit of the last digit (`10/3 = 3.33` or
    # `3.34`; `14.99` for a calculator's 14.999999999999998), but `3.32` is wrong.
    return diff <= Fraction(1, 10**decimals)


def _approx_ok(exact: Fraction, stated: Fraction, decimals: int | None) -> bool:
    """`exact ≈ stated`: off by less than one unit of the stated number's last digit (`10/3 ≈ 3`, `≈ 3.3`,
    `≈ 3.34`), or by at most 1 % (`1000/3 ≈ 330`)."""
    diff = abs(exact - stated)
    if decimals is not None and diff < Fraction(1, 10**decimals):
        return True
    return diff <= _APPROX_REL * abs(exact)


def _pair_ok(left: list[Fraction], right: list[Fraction], sl: _Side, sr: _Side, cfg: ArithCheckConfig,
             approx: bool = False) -> bool:
    noisy = sl.float_noise or sr.float_noise
    if approx:
        # `a ≈ b`: b is a rounding of a (or a of b when a is the number as written).
        return any(_approx_ok(lv, rv, sr.decimals) if sr.literal is not None or sl.literal is None
                   else _approx_ok(rv, lv, sl.decimals) for lv in left for rv in right)
    for lv in left:
        for rv in right:
            if sr.literal is not None and not sr.percent:
                good = _close(lv, rv, sr.decimals, cfg, noisy)
            elif sl.literal is not None and not sl.percent:
                good = _close(rv, lv, sl.decimals, cfg, noisy)
            elif sr.literal is not None:  # `= 25%`: 0.25 or 25, with the decimals as written
                good = _close(lv, rv, sr.decimals if rv == sr.literal else None, cfg, noisy)
            else:
                good = _close(lv, rv, None, cfg, noisy)
            # A running computation writes `5 + 3 = 8 - 2 = 6`: the next side starts with this side's value.
            if good or (sr.leading is not None and _close(lv, sr.leading, None, cfg, noisy)):
                return True
    return False


def _check_chain(sides: list[list[_Tok]], text: str, cfg: ArithCheckConfig, strict: bool,
                 approx: Sequence[bool] = (), scale: int = 1) -> _Check | None:
    """Check `s0 = s1 = ...`; None when (not strict) the chain is not clean arithmetic and is skipped.
    `approx[i]`: sides i and i + 1 are joined by `≈`; `scale`: the last side is followed by a scale word
    (`= 3.2 million`), so the side before it may be in units or already in that unit."""
    try:
        parsed = [_side(s) for s in sides]
    except (_Malformed, ValueError, ZeroDivisionError, OverflowError) as exc:
        return _Check(text, None, str(exc)) if strict else None
    # Inline, a chain must start with a computation: `x 4 = 1/4` (from `3/8s x 4 = 1/4s`) or `8 = 2*4` is
    # prose around numbers more often than a statement. An annotation is always the model's statement.
    if not strict and not parsed[0].has_op:
        return None
    if scale != 1 and parsed[-1].literal is None:
        return None  # `= 2 + 1.2 million`: which part the word scales is not clear
    try:
        # A side that is one number as written needs no parser (half of all sides: the stated results).
        values = [[p.literal] if p.literal is not None and not p.percent else [_value(src) for src in p.sources]
                  for p in parsed]
    except _Malformed as exc:
        return _Check(text, None, str(exc))
    except Exception as exc:  # SymPy's own errors
        return _Check(text, None, f"{type(exc).__name__}: {exc}")
    for i in range(len(parsed) - 1):
        left = values[i]
        if scale != 1 and i == len(parsed) - 2:
            # `1,500,000 + 1,700,000 = 3.2 million` computes in units, `3 * 0.8 = 2.4 billion` in billions:
            # either reading of the left side may match 3.2 as written.
            left = left + [v / scale for v in left]
        if not _pair_ok(left, values[i + 1], parsed[i], parsed[i + 1], cfg, i < len(approx) and approx[i]):
            return _Check(text, False, f"{'left side' if i == 0 else f'side {i + 1}'} is {_fmt(values[i][0])}")
    return _Check(text, True)


def _fmt(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    f = float(v)
    return f"{f:.6g}" if abs(f) < 1e15 else str(v)


def _split_runs(toks: list[_Tok]) -> list[tuple[list[_Tok], _Tok, _Tok, bool]]:
    """Maximal runs of arithmetic tokens that contain `=`, each with the non-space token before it, the
    token right after it, and whether it is cut out of a longer number (`_glued`)."""
    runs: list[tuple[list[_Tok], _Tok, _Tok, bool]] = []
    cur: list[_Tok] = []
    start = _Tok("start", "")
    before = start
    last = start
    first = 0
    for j, t in enumerate(toks + [_Tok("end", "")]):
        if t.kind in _MATH_KINDS:
            if not cur:
                before, first = last, j
            cur.append(t)
        else:
            if any(x.kind == "eq" for x in cur):
                # Trailing spaces belong to the run but not to its last number.
                end = j
                while end > first and toks[end - 1].kind == "sp":
                    end -= 1
                lead = first
                while lead < end and toks[lead].kind == "sp":
                    lead += 1
                runs.append((cur, before, t, _glued(toks, lead, end)))
            cur = []
        if t.kind != "sp":
            last = t
    return runs


# Words that make the numbers after them part of a larger expression in prose (`$3.5/gallon x 2/5 = ...`,
# `3/4 of 12 = 9`): a chain right after one of them is not a closed statement.
_JOINING_WORDS = {"x", "X", "times", "of", "per", "by", "over", "plus", "minus"}


def _sides(run: list[_Tok]) -> list[list[_Tok]]:
    sides: list[list[_Tok]] = [[]]
    for t in run:
        if t.kind == "eq":
            sides.append([])
        else:
            sides[-1].append(t)
    return sides


def _approx_joins(run: Sequence[_Tok]) -> list[bool]:
    """For each `=`-like sign of a run in order: is it `≈`?"""
    return [t.text in _APPROX for t in run if t.kind == "eq"]


def _glued(toks: Sequence[_Tok], start: int, end: int) -> bool:
    """Is the run `toks[start:end]` cut out of a longer number: a digit, then `,` or `.`, right before it
    (`0,5 + 1`), or `,`/`.` and a digit right after it (`= $3,2 million`, a decimal comma)? Its first or last
    number is then not the number the text states."""
    def num(i: int) -> bool:
        return 0 <= i < len(toks) and toks[i].kind == "num"

    def sep(i: int) -> bool:
        return 0 <= i < len(toks) and toks[i].kind == "other" and toks[i].text in (",", ".")

    return (num(start) and sep(start - 1) and num(start - 2)) or (num(end - 1) and sep(end) and num(end + 1))


def _text(toks: Sequence[_Tok]) -> str:
    return "".join(t.text for t in toks).strip()


def check_step(text: str, cfg: ArithCheckConfig | None = None) -> tuple[Status, list[_Check]]:
    """The step's status and every equation found in it (pure; never raises)."""
    cfg = cfg or ArithCheckConfig()
    checks: list[_Check] = []
    if len(text) > cfg.max_step_chars:
        return Status.ERROR, [_Check(text[:40] + "...", None, f"step longer than {cfg.max_step_chars} chars")]
    if cfg.annotations:
        for m in _ANNOTATION_RE.finditer(text):
            inner = m.group(1)
            if "=" not in inner:
                continue  # a bare value (`<<83.33>>`) states nothing to check
            toks = [t for t in _tokens(inner)]
            sides = _sides(toks)
            if any(not _text(s) for s in sides):
                checks.append(_Check(f"<<{inner}>>", None, "empty side"))
                continue
            found = _check_chain(sides, f"<<{inner}>>", cfg, strict=True, approx=_approx_joins(toks))
            if found is not None:
                checks.append(found)
    if cfg.inline:
        # The annotation is the calculator's, the text around it is the model's: `16 - 3 = <<16-3=13>>14`
        # states 16 - 3 = 14 in the text, so the text is checked with the annotations removed.
        plain = _ANNOTATION_RE.sub("", text) if cfg.annotations or "<<" in text else text
        for run, before, after, glued in _split_runs(_tokens(plain)):
            sides = _sides(run)
            if not _text(sides[0]) or not _text(sides[-1]):
                continue
            first = [t for t in sides[0] if t.kind != "sp"]
            # A run cut out of prose may start with an operator that belongs to the words before it
            # (`3 apples * 2 = 6`), follow a joining word, or end on a number glued to a variable
            # (`= 2x`): none is a closed arithmetic statement, so it is skipped.
            if first[0].kind == "op" and before.kind not in ("start", "other"):
                continue
            if before.kind == "word" and before.text in _JOINING_WORDS:
                continue
            if after.kind == "word" and len(after.text) == 1 and run[-1].kind != "sp":
                continue
            # A number cut by a comma or point glued to more digits (`= $3,2 million`) is not the number stated.
            if glued:
                continue
            scale = _SCALE_WORDS.get(after.text.lower(), 1) if after.kind == "word" else 1
            found = _check_chain(sides, _text(run), cfg, strict=False, approx=_approx_joins(run), scale=scale)
            if found is not None:
                checks.append(found)
    if any(c.ok is False for c in checks):
        return Status.INVALID, checks
    if any(c.ok is None for c in checks):
        return Status.ERROR, checks
    if checks:
        return Status.VALID, checks
    return Status.NONE, checks


def _detail(status: Status, checks: list[_Check]) -> str:
    if status is Status.NONE:
        return "no equation in the step"
    if status is Status.VALID:
        return f"{len(checks)} equation(s) hold"
    bad = next(c for c in checks if c.ok is (False if status is Status.INVALID else None))
    return f"`{bad.text}`: {bad.why}"[:300]


class ArithCheck:
    """`Verifier` over `StepItem`s: one verdict per step, `score` 1.0 valid / 0.0 invalid."""

    name = NAME

    def __init__(self, config: ArithCheckConfig | None = None) -> None:
        import sympy

        self.config = config or ArithCheckConfig()
        self.version = f"1+sympy-{sympy.__version__}"

    def check(self, text: str) -> Verdict:
        try:
            status, checks = check_step(text, self.config)
            detail = _detail(status, checks)
        except Exception as exc:  # a bug here must not fail a build: the step is undecided, and says why
            status, detail = Status.ERROR, f"checker failed: {type(exc).__name__}: {exc}"[:300]
        score = {Status.VALID: 1.0, Status.INVALID: 0.0}.get(status)
        return Verdict(self.name, self.version, status, score, detail)

    async def verify(self, batch: Sequence[StepItem]) -> list[Verdict]:
        # Pure CPU and fast (parses are cached); a solution's steps repeat across a tree's paths.
        return [self.check(item.text) for item in batch]

    async def aclose(self) -> None:
        return None
