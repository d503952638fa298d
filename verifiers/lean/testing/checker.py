"""The stand-in's checker: decides a stated fragment of Lean 4 for real, and refuses everything else.

This is not Lean. It exists so the Lean clients can be tested where no Lean toolchain installs. Inside
the fragment its verdicts are Lean's verdicts (computed exactly with `fractions.Fraction`); outside it,
it raises `OutsideFragment`, which the stand-in servers answer with a REPL-level error object, so a
client reports `error`, never a fake `valid` or `invalid`.

The fragment:
- Commands: `import` lines (only first, only without `env`), `set_option …`, `open …`, comments, and
  declarations `theorem NAME (h : CLAIM)… : CLAIM := by …`, `lemma …`, `example …`. Binders may only be
  hypotheses with closed claims; a statement with variables (e.g. miniF2F) is accepted only when its
  whole proof is `sorry`, which Lean answers with the sorry warning whatever the statement says.
- Claims: `a REL b` with REL in = ≠ < ≤ > ≥, over numerals and decimals, + - * / % ^, parentheses and
  type ascriptions `(e : T)`, T in ℕ ℤ ℚ ℝ (or Nat Int Rat Real). One type per claim (mixed types would
  need Lean's coercion insertion); no ascription means ℕ, like Lean's numeral default. Lean's semantics:
  ℕ subtraction truncates at 0, ℕ division floors, ℤ `/` and `%` are Euclidean (`Int.ediv`/`Int.emod`:
  the remainder is never negative), x / 0 = 0 in every type, n % 0 = n.
- Tactics, one per line (or inline after `by`): `norm_num` (needs Mathlib), `simp` (ℕ, ℤ), `decide`
  (ℕ, ℤ, ℚ), `rfl` (= over ℕ, ℤ), `linarith` (needs Mathlib; proves a true comparison, or anything when
  a closed comparison hypothesis in scope is false), `exact h` (h a hypothesis or earlier theorem whose
  claim is written the same way as the goal, or, over ℕ, has equal values on each side: Lean's defeq check
  folds ground ℕ arithmetic), `have h : CLAIM := by TACTIC` (inline or with an indented
  block; a failing inner proof is reported and `h` is still added, as Lean's error recovery does), and
  `sorry`.
- Messages: positions, severities and the sorry warning are Lean's; message texts follow Lean's wording
  where the stand-in knows it and are otherwise short approximations (they never start with "unsolved
  goals" unless the goals are unsolved).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

FRAGMENT = ("closed ℕ/ℤ/ℚ/ℝ arithmetic with norm_num, simp, decide, rfl, linarith, exact, have, sorry; "
            "see the stand-in section of the README")


class OutsideFragment(Exception):
    """The input is outside what the stand-in decides; it must never become a verdict."""

    def __init__(self, what: str) -> None:
        super().__init__(f"stand-in: {what} is outside the stand-in's fragment ({FRAGMENT}); it is not Lean")


TYPE_NAMES = {"ℕ": "ℕ", "Nat": "ℕ", "ℤ": "ℤ", "Int": "ℤ", "ℚ": "ℚ", "Rat": "ℚ", "ℝ": "ℝ", "Real": "ℝ"}
RELATIONS = {"=": "=", "≠": "≠", "<": "<", "≤": "≤", "<=": "≤", ">": ">", "≥": "≥", ">=": "≥"}
_TOKEN_RE = re.compile(r"\s*(?:(\d+\.\d+|\d+)|(ℕ|ℤ|ℚ|ℝ|Nat\b|Int\b|Rat\b|Real\b)|(≤|≥|≠|<=|>=|=|<|>)|([-+*/%^():]))")
_MAX_DIGITS = 10_000  # results beyond this are not "closed arithmetic" a proof would contain


# --- claims -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    text: str


@dataclass(frozen=True)
class Neg:
    arg: "Expr"


@dataclass(frozen=True)
class Bin:
    op: str
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Asc:
    arg: "Expr"
    type: str


Expr = Num | Neg | Bin | Asc
_PREC = {"+": 65, "-": 65, "*": 70, "/": 70, "%": 70, "^": 75}


def _strip(e: Expr) -> Expr:
    """The expression without type ascriptions (how Lean prints it, and what `exact` compares)."""
    if isinstance(e, Asc):
        return _strip(e.arg)
    if isinstance(e, Neg):
        return Neg(_strip(e.arg))
    if isinstance(e, Bin):
        return Bin(e.op, _strip(e.left), _strip(e.right))
    return e


def render(e: Expr, parent: int = 0, right: bool = False) -> str:
    """Lean-style text without ascriptions and with the fewest parentheses."""
    e = _strip(e)
    if isinstance(e, Num):
        return e.text
    if isinstance(e, Neg):
        text = "-" + render(e.arg, 75)
        return f"({text})" if parent > 75 else text
    assert isinstance(e, Bin)
    p = _PREC[e.op]
    if e.op == "^":  # right-associative
        text = f"{render(e.left, p + 1)} ^ {render(e.right, p)}"
    else:
        text = f"{render(e.left, p)} {e.op} {render(e.right, p + 1)}"
    return f"({text})" if p < parent else text


@dataclass(frozen=True)
class Claim:
    rel: str
    left: Expr
    right: Expr
    type: str

    def text(self) -> str:
        return f"{render(self.left)} {self.rel} {render(self.right)}"

    def key(self) -> tuple:
        return (self.rel, self.type, _strip(self.left), _strip(self.right))

    def holds(self) -> bool:
        a, b = evaluate(self.left, self.type), evaluate(self.right, self.type)
        return {"=": a == b, "≠": a != b, "<": a < b, "≤": a <= b, ">": a > b, "≥": a >= b}[self.rel]

    def uses(self, ops: set[str]) -> bool:
        def walk(e: Expr) -> bool:
            if isinstance(e, Bin):
                return e.op in ops or walk(e.left) or walk(e.right)
            if isinstance(e, (Neg, Asc)):
                return walk(e.arg)
            return False

        return walk(self.left) or walk(self.right)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if not m or m.end() == pos:
                raise OutsideFragment(f"the term {text[pos:pos + 20]!r}")
            kind = "num" if m.group(1) else "type" if m.group(2) else "rel" if m.group(3) else "op"
            self.tokens.append((kind, m.group(m.lastindex or 0)))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.i = 0
        self.types: set[str] = set()

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise OutsideFragment(f"a claim that does not parse (expected {value or 'more'})")
        self.i += 1
        return tok

    def expr(self, min_prec: int = 0) -> Expr:
        tok = self.peek()
        if tok == ("op", "-"):
            self.take()
            left: Expr = Neg(self.expr(75))
        else:
            left = self.atom()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in _PREC:
            prec = _PREC[tok[1]]
            if prec < min_prec:
                break
            self.take()
            right = self.expr(prec if tok[1] == "^" else prec + 1)
            left = Bin(tok[1], left, right)
        return left

    def atom(self) -> Expr:
        kind, value = self.take()
        if kind == "num":
            return Num(value)
        if value != "(":
            raise OutsideFragment(f"the token {value!r} here")
        inner = self.expr()
        if self.peek() == ("op", ":"):
            self.take()
            kind, name = self.take()
            if kind != "type":
                raise OutsideFragment(f"the type {name!r}")
            self.take(")")
            self.types.add(TYPE_NAMES[name])
            return Asc(inner, TYPE_NAMES[name])
        self.take(")")
        return inner


def parse_claim(text: str) -> Claim:
    p = _Parser(text)
    left = p.expr()
    tok = p.peek()
    if tok is None or tok[0] != "rel":
        raise OutsideFragment(f"the claim {text.strip()!r} (not a comparison)")
    p.take()
    right = p.expr()
    if p.peek() is not None:
        raise OutsideFragment(f"the claim {text.strip()!r}")
    if len(p.types) > 1:
        raise OutsideFragment(f"a claim mixing types {sorted(p.types)} (needs Lean's coercions)")
    claim = Claim(RELATIONS[tok[1]], left, right, next(iter(p.types), "ℕ"))
    evaluate(claim.left, claim.type)  # type errors (a decimal in ℕ, negation in ℕ) surface at parse time
    evaluate(claim.right, claim.type)
    return claim


def _ediv(a: int, b: int) -> int:
    if b == 0:
        return 0
    q = abs(a) // abs(b) if a >= 0 else -((-a + abs(b) - 1) // abs(b))  # floor(a / |b|)
    return q if b > 0 else -q


def evaluate(e: Expr, ty: str) -> Fraction:
    """The value of `e` in type `ty` with Lean's semantics (see the module docstring)."""
    if isinstance(e, Asc):
        return evaluate(e.arg, ty)
    if isinstance(e, Num):
        if "." in e.text and ty in ("ℕ", "ℤ"):
            raise OutsideFragment(f"a decimal literal in {ty}")
        return Fraction(e.text)
    if isinstance(e, Neg):
        if ty == "ℕ":
            raise OutsideFragment("negation in ℕ (Lean: failed to synthesize Neg ℕ)")
        return -evaluate(e.arg, ty)
    a = evaluate(e.left, ty)
    if e.op == "^":
        if any(isinstance(x, Asc) for x in _walk(e.right)):
            raise OutsideFragment("a typed exponent")
        n = evaluate(e.right, "ℕ")
        if n > _MAX_DIGITS or (abs(a) > 1 and n * max(len(str(abs(a.numerator))), 1) > _MAX_DIGITS):
            raise OutsideFragment("a power this large")
        return a ** int(n)
    b = evaluate(e.right, ty)
    if e.op == "+":
        return a + b
    if e.op == "*":
        return a * b
    if e.op == "-":
        return max(a - b, Fraction(0)) if ty == "ℕ" else a - b
    if e.op == "/":
        if b == 0:
            return Fraction(0)
        if ty == "ℕ":
            return Fraction(int(a) // int(b))
        if ty == "ℤ":
            return Fraction(_ediv(int(a), int(b)))
        return a / b
    if e.op == "%":
        if ty in ("ℚ", "ℝ"):
            raise OutsideFragment(f"% in {ty}")
        if b == 0:
            return a
        return Fraction(int(a) - int(b) * (int(a) // int(b) if ty == "ℕ" else _ediv(int(a), int(b))))
    raise OutsideFragment(f"the operator {e.op!r}")


def _walk(e: Expr):
    yield e
    if isinstance(e, (Neg, Asc)):
        yield from _walk(e.arg)
    elif isinstance(e, Bin):
        yield from _walk(e.left)
        yield from _walk(e.right)


# --- goals, tactics and commands ------------------------------------------------------------------------


@dataclass
class Goal:
    hyps: list[tuple[str, Claim | None, str]]  # (name, claim or None when not closed, printed type)
    target: Claim | None
    target_text: str

    def pretty(self) -> str:
        lines = [f"{name} : {text}" for name, _, text in self.hyps]
        return "\n".join(lines + [f"⊢ {self.target_text}"])

    def with_hyp(self, name: str, claim: Claim) -> "Goal":
        hyps = [h for h in self.hyps if h[0] != name] + [(name, claim, claim.text())]
        return Goal(hyps, self.target, self.target_text)


@dataclass
class Msg:
    severity: str
    line: int
    column: int
    end_line: int
    end_column: int
    data: str

    def to_json(self, line_shift: int = 0) -> dict:
        return {"severity": self.severity, "pos": {"line": self.line + line_shift, "column": self.column},
                "endPos": {"line": self.end_line + line_shift, "column": self.end_column}, "data": self.data}


@dataclass
class SorryAt:
    line: int
    column: int
    goal: Goal


@dataclass
class Tactic:
    line: int  # 1-based within the checked text
    column: int
    text: str
    children: list["Tactic"] = field(default_factory=list)
    nested_by: tuple[int, int] | None = None  # where a `have … := by` opens its nested block


class TacticFailed(Exception):
    """A tactic threw: Lean reports it at the tactic and abandons the enclosing `by` block."""

    def __init__(self, data: str, tactic: "Tactic | None" = None) -> None:
        super().__init__(data)
        self.data = data
        self.tactic = tactic


@dataclass
class Context:
    """What tactics may consult: Mathlib present, theorems proved earlier in the environment."""

    mathlib: bool
    theorems: dict[str, Claim]
    messages: list[Msg] = field(default_factory=list)
    sorries: list[SorryAt] = field(default_factory=list)
    sorry_used: bool = False  # any sorry in the proof term, explicit or from error recovery
    old_sorry_quote: bool = True  # the warning says 'sorry' (Lean <= v4.27) or `sorry` (v4.28 on)


_HAVE_RE = re.compile(r"^have\s+(?:([^\s:]+)\s*)?:\s*(.+?)\s*:=\s*(.*)$")


def _need_mathlib(ctx: Context, what: str) -> None:
    if not ctx.mathlib:
        raise OutsideFragment(f"{what} without `import Mathlib`")


def _close(tac: Tactic, goal: Goal, ctx: Context) -> None:
    """Runs a closing tactic on `goal`; raises TacticFailed with Lean's complaint if it does not close."""
    name, _, rest = tac.text.partition(" ")
    rest = rest.strip()
    c = goal.target
    assert c is not None
    if name in ("norm_num", "simp") and not rest:
        if name == "norm_num":
            _need_mathlib(ctx, "norm_num")
        elif c.type in ("ℚ", "ℝ"):
            raise OutsideFragment(f"`simp` on a {c.type} goal")
        if not c.holds():
            raise TacticFailed(f"{name} failed to prove the goal: it simplifies to False")
        return
    if name == "decide" and not rest:
        if c.type == "ℝ":
            raise OutsideFragment("`decide` on a ℝ goal")
        if not c.holds():
            raise TacticFailed(f"tactic 'decide' proved that the proposition\n  {c.text()}\nis false")
        return
    if name == "rfl" and not rest:
        if c.rel != "=" or c.type not in ("ℕ", "ℤ"):
            raise OutsideFragment(f"`rfl` on a {c.type} {c.rel} goal")
        if not c.holds():
            raise TacticFailed(f"The rfl tactic failed. The left-hand side\n  {render(c.left)}\nis not "
                               f"definitionally equal to the right-hand side\n  {render(c.right)}")
        return
    if name == "linarith" and not rest:
        _need_mathlib(ctx, "linarith")
        claims = [h for _, h, _ in goal.hyps if h is not None] + [c]
        if any(h.type in ("ℕ", "ℤ") and h.uses({"/", "%"} | ({"-"} if h.type == "ℕ" else set())) for h in claims):
            raise OutsideFragment("`linarith` over ℕ/ℤ division or ℕ subtraction")
        if c.rel != "≠" and c.holds():
            return
        if any(h.rel != "≠" and not h.holds() for _, h, _ in goal.hyps if h is not None):
            return  # the hypotheses contradict each other: linarith proves anything
        raise TacticFailed("linarith failed to find a contradiction\n" + goal.pretty() + "\n⊢ False failed")
    if name == "exact" and re.fullmatch(r"[^\s()]+", rest):
        known = {n: h for n, h, _ in goal.hyps} | {n: h for n, h in ctx.theorems.items() if n not in
                                                    {x for x, _, _ in goal.hyps}}
        if rest not in known:
            raise TacticFailed(f"unknown identifier '{rest}'")
        h = known[rest]
        if h is None:
            raise OutsideFragment(f"`exact {rest}` with an open hypothesis")
        if h.key() == c.key():
            return
        same_values = (h.rel, h.type) == (c.rel, c.type) and all(
            evaluate(x, c.type) == evaluate(y, c.type) for x, y in ((h.left, c.left), (h.right, c.right)))
        if same_values and c.type == "ℕ":
            return  # Lean's defeq check folds ground ℕ arithmetic: equal values on each side match
        # Terms with different values are never definitionally equal (defeq implies equal), in any type.
        if not same_values or h.type == "ℕ":
            raise TacticFailed(f"type mismatch\n  {rest}\nhas type\n  {h.text()} : Prop\nbut is expected to "
                               f"have type\n  {c.text()} : Prop")
        raise OutsideFragment(f"`exact {rest}` where only definitional unfolding could decide")
    raise OutsideFragment(f"the tactic `{tac.text}`")


def run_block(tactics: list[Tactic], goals: list[Goal], ctx: Context) -> list[Goal]:
    """Runs a tactic block; returns the goals left. Raises TacticFailed at the first failing tactic."""
    goals = list(goals)
    for tac in tactics:
        if not goals:
            raise TacticFailed("no goals to be proved", tac)
        goal = goals[0]
        if tac.text == "sorry" and not tac.children:
            ctx.sorries.append(SorryAt(tac.line, tac.column, goal))
            ctx.sorry_used = True
            goals = goals[1:]
            continue
        if goal.target is None:
            raise OutsideFragment("a tactic other than `sorry` on a goal with variables")
        m = _HAVE_RE.match(tac.text)
        if m:
            name = m.group(1) or "this"
            claim = parse_claim(m.group(2))
            proof = m.group(3).strip()
            sub = Goal(goal.hyps, claim, claim.text())
            if proof == "sorry":
                col = tac.column + tac.text.rindex("sorry")
                ctx.sorries.append(SorryAt(tac.line, col, sub))
                ctx.sorry_used = True
            elif proof.startswith("by"):
                inner = proof[2:].strip()
                assert tac.nested_by is not None
                block = tac.children if not inner else [Tactic(tac.line, tac.column + tac.text.rindex(inner), inner)]
                if not block:
                    raise OutsideFragment("an empty `by` block")
                run_nested(block, [sub], ctx, tac.nested_by)
            else:
                raise OutsideFragment(f"the term proof `{proof}`")
            goals = [goal.with_hyp(name, claim)] + goals[1:]
            continue
        if tac.children:
            raise OutsideFragment(f"a multi-line tactic `{tac.text}`")
        if any(tok in tac.text for tok in (";", "<;>", "·", "at ")):
            raise OutsideFragment(f"the tactic `{tac.text}`")
        try:
            _close(tac, goal, ctx)
        except TacticFailed as exc:
            exc.tactic = tac
            raise
        goals = goals[1:]
    return goals


def run_nested(block: list[Tactic], goals: list[Goal], ctx: Context, by_pos: tuple[int, int]) -> None:
    """A `by` block whose failure Lean recovers from: the error is reported, the term becomes sorry."""
    try:
        left = run_block(block, goals, ctx)
    except TacticFailed as exc:
        tac = exc.tactic or block[0]
        ctx.messages.append(Msg("error", tac.line, tac.column, tac.line, tac.column + len(tac.text), exc.data))
        ctx.sorry_used = True
        return
    if left:
        ctx.messages.append(Msg("error", by_pos[0], by_pos[1], by_pos[0], by_pos[1] + 2,
                                "unsolved goals\n" + "\n\n".join(g.pretty() for g in left)))
        ctx.sorry_used = True


# --- command text -------------------------------------------------------------------------------------


def _blank_comments(text: str) -> str:
    """Comments replaced by spaces, so every position stays where Lean would put it."""
    out = re.sub(r"/-.*?-/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)
    return "\n".join(re.sub(r"--.*$", lambda m: " " * len(m.group(0)), line) for line in out.split("\n"))


def _tactic_lines(lines: list[tuple[int, int, str]]) -> list[Tactic]:
    """(line no, column, text) lines of a block, grouped by indentation into tactics with children."""
    out: list[Tactic] = []
    if not lines:
        return out
    indent = lines[0][1]
    i = 0
    while i < len(lines):
        ln, col, text = lines[i]
        if col < indent:
            raise OutsideFragment("a tactic block with uneven indentation")
        j = i + 1
        while j < len(lines) and lines[j][1] > indent:
            j += 1
        tac = Tactic(ln, col, text, _tactic_lines(lines[i + 1:j]) if j > i + 1 else [])
        if text.endswith(":= by"):
            tac.nested_by = (ln, col + len(text) - 2)
        elif re.search(r":= by\s", text):
            tac.nested_by = (ln, col + text.rindex(":= by") + 3)
        if tac.children and tac.nested_by is None:
            raise OutsideFragment(f"a multi-line tactic `{text}`")
        out.append(tac)
        i = j
    return out


_DECL_RE = re.compile(r"^(theorem|lemma|example)\b")
_BINDER_RE = re.compile(r"\s*([({\[])")


@dataclass
class Declaration:
    kind: str
    name: str | None
    name_pos: tuple[int, int]
    hyps: list[tuple[str, Claim | None, str]]
    target: Claim | None
    target_text: str
    proof_lines: list[tuple[int, int, str]]  # the block after `by` (first may be inline)
    by_pos: tuple[int, int] | None  # None: a term proof (only `sorry`)
    term: str
    term_pos: tuple[int, int] = (0, 0)


def _split_top(text: str, sep: str) -> int:
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i) and not text.startswith(":=", i):
            return i
    return -1


def _parse_binders(text: str) -> tuple[list[tuple[str, Claim | None, str]], bool]:
    """Hypotheses from binders; the flag says whether some binder is a variable (the statement is open)."""
    hyps: list[tuple[str, Claim | None, str]] = []
    open_ = False
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        opener = text[i]
        closer = {"(": ")", "{": "}", "[": "]"}.get(opener)
        if closer is None:
            raise OutsideFragment(f"the binder text {text[i:i + 20]!r}")
        depth, j = 0, i
        while j < len(text):
            depth += text[j] in "([{"
            depth -= text[j] in ")]}"
            if depth == 0:
                break
            j += 1
        inner = text[i + 1:j]
        i = j + 1
        names, colon, typ = inner.partition(":")
        if opener != "(" or not colon:
            open_ = True
            continue
        typ = " ".join(typ.split())
        try:
            claim = parse_claim(typ)
        except OutsideFragment:
            open_ = True
            hyps.extend((n, None, typ) for n in names.split())
            continue
        hyps.extend((n, claim, typ) for n in names.split())
    return hyps, open_


def parse_declaration(lines: list[tuple[int, str]]) -> Declaration:
    """A declaration from its (line no, text) lines."""
    first_no, first = lines[0]
    m = _DECL_RE.match(first)
    assert m
    kind = m.group(1)
    # Flatten with a position map so `:=` and `by` can be found across lines.
    flat, where = "", []
    for no, text in lines:
        for col, ch in enumerate(text):
            flat += ch
            where.append((no, col))
        flat += "\n"
        where.append((no, len(text)))
    assign = flat.find(":=")
    if assign < 0:
        raise OutsideFragment(f"a {kind} without `:=`")
    head = flat[len(kind):assign]
    name = None
    name_pos = (first_no, 0)
    if kind != "example":
        nm = re.match(r"\s*([^\s(\[{:]+)", head)
        if not nm:
            raise OutsideFragment(f"a {kind} without a name")
        name = nm.group(1)
        name_pos = where[len(kind) + nm.start(1)]
        head = head[nm.end():]
    colon = _split_top(head, ":")
    if colon < 0:
        raise OutsideFragment(f"a {kind} without a stated type")
    hyps, open_ = _parse_binders(head[:colon])
    target_text = " ".join(head[colon + 1:].split())
    target: Claim | None
    try:
        target = None if open_ else parse_claim(target_text)
    except OutsideFragment:
        target = None
    after = assign + 2
    rest = flat[after:]
    stripped = rest.lstrip()
    by_pos = None
    proof_lines: list[tuple[int, int, str]] = []
    term = ""
    if stripped.startswith("by") and (len(stripped) == 2 or not (stripped[2].isalnum() or stripped[2] == "_")):
        by_at = after + (len(rest) - len(stripped))
        by_pos = where[by_at]
        inline = flat[by_at + 2:].split("\n", 1)[0]
        if inline.strip():
            col = by_pos[1] + 2 + (len(inline) - len(inline.lstrip()))
            proof_lines.append((by_pos[0], col, inline.strip()))
        for no, text in lines:
            if no > by_pos[0] and text.strip():
                proof_lines.append((no, len(text) - len(text.lstrip()), text.strip()))
    else:
        term = " ".join(stripped.split())
    term_pos = where[after + (len(rest) - len(stripped))] if stripped else where[after - 1]
    return Declaration(kind, name, name_pos, hyps, target, target_text, proof_lines, by_pos, term, term_pos)


def split_commands(text: str) -> tuple[list[tuple[int, str]], list[list[tuple[int, str]]], list[str]]:
    """(import lines, declarations as line groups, other accepted lines); raises OutsideFragment."""
    clean = _blank_comments(text)
    imports: list[tuple[int, str]] = []
    decls: list[list[tuple[int, str]]] = []
    other: list[str] = []
    seen_non_import = False
    for no, line in enumerate(clean.split("\n"), start=1):
        if not line.strip():
            continue
        if line[0].isspace():
            if not decls:
                raise OutsideFragment("an indented line outside a declaration")
            decls[-1].append((no, line))
            continue
        if line.startswith("import "):
            if seen_non_import:
                imports.append((-no, line))  # an import after other commands: Lean's error below
            else:
                imports.append((no, line))
            continue
        seen_non_import = True
        if _DECL_RE.match(line):
            decls.append([(no, line)])
        elif re.match(r"^(set_option|open)\s", line):
            other.append(line)
        else:
            raise OutsideFragment(f"the command {line.split()[0]!r}")
    return imports, decls, other


def check_declaration(decl: Declaration, ctx: Context) -> None:
    """Elaborates one declaration into ctx.messages/ctx.sorries (raises OutsideFragment)."""
    goal = Goal(decl.hyps, decl.target, decl.target.text() if decl.target else decl.target_text)
    start = len(ctx.sorries)
    if decl.by_pos is None:
        if decl.term != "sorry":
            raise OutsideFragment(f"the term proof `{decl.term}`")
        ctx.sorries.append(SorryAt(decl.term_pos[0], decl.term_pos[1], goal))
        ctx.sorry_used = True
    else:
        block = _tactic_lines(decl.proof_lines)
        if not block:
            raise OutsideFragment("an empty `by` block")
        if decl.target is None and [t.text for t in block] != ["sorry"]:
            raise OutsideFragment("a proof of a statement with variables or outside the claim grammar "
                                  "(only `sorry` is decided there)")
        run_nested(block, [goal], ctx, decl.by_pos)
    if len(ctx.sorries) > start:
        word = "'sorry'" if ctx.old_sorry_quote else "`sorry`"
        line, col = decl.name_pos
        length = len(decl.name) if decl.name else len("example")
        ctx.messages.append(Msg("warning", line, col, line, col + length, f"declaration uses {word}"))
    if decl.name and decl.target is not None:
        ctx.theorems[decl.name] = decl.target


def parse_tactic_text(text: str) -> list[Tactic]:
    """Tactic-mode input (one tactic, or a block of lines) as tactics positioned in that text."""
    clean = _blank_comments(text)
    lines = [(no, len(line) - len(line.lstrip()), line.strip())
             for no, line in enumerate(clean.split("\n"), start=1) if line.strip()]
    return _tactic_lines(lines)

