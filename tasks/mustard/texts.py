"""The texts of the MUSTARD-style loop: the author's answer format, the Lean file it carries, and the Lean
feedback shown to the author when it revises.

An answer has three sections and a fenced Lean block (the templates `mustard-author.jinja` and
`mustard-revise.jinja` ask for exactly this)::

    Problem:
    <a statement to prove>

    Informal proof:
    <natural-language proof>

    Formal proof:
    ```lean
    import Mathlib

    theorem name : ... := by
      ...
    ```

Headings may be bold (`**Problem:**`) and the fence may say `lean4` or nothing; anything else missing makes
the answer malformed, with the missing part named. Line numbers shown to the author count lines of the Lean
block as written (imports included), as Lean reports them for that file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verifiers.lean.base import LeanItem
from verifiers.lean.verdict import LeanOutcome

# Markers the revise template writes and the simulated author reads (a real model just reads the text).
PREVIOUS_MARK = "Your previous answer:"
FEEDBACK_MARK = "Lean 4 checked the formal proof and reported:"

_HEADING = r"^[ \t]*(?:\*\*|#+[ \t]*)?{name}[ \t]*(?:\*\*)?[ \t]*:[ \t]*(?:\*\*)?"
_SECTIONS = (("problem", "Problem"), ("informal", "Informal proof"), ("formal", "Formal proof"))
_FENCE_RE = re.compile(r"```[ \t]*(?:lean4?|Lean4?)?[ \t]*\n(?P<code>.*?)```", re.DOTALL)
_STATEMENT_RE = re.compile(r"^(?:theorem|lemma|example)\b.*?:=(?:\s*by\b)?", re.DOTALL | re.MULTILINE)


class MalformedAnswer(ValueError):
    """The author's answer lacks a section or the Lean block; the message names what is missing."""


@dataclass(frozen=True)
class Answer:
    problem: str
    informal: str
    formal: str  # the Lean block as written (imports included)


def _heading(name: str) -> re.Pattern[str]:
    return re.compile(_HEADING.format(name=re.escape(name)), re.IGNORECASE | re.MULTILINE)


def parse_answer(text: str) -> Answer:
    """The three sections of an answer; `MalformedAnswer` naming the first part that is missing or empty."""
    starts: list[tuple[str, int, int]] = []
    for key, name in _SECTIONS:
        m = _heading(name).search(text)
        if m is None:
            raise MalformedAnswer(f"no `{name}:` section")
        starts.append((key, m.start(), m.end()))
    order = sorted(starts, key=lambda s: s[1])
    if [k for k, _, _ in order] != [k for k, _ in _SECTIONS]:
        raise MalformedAnswer("sections out of order (expected Problem, Informal proof, Formal proof)")
    parts = {}
    for i, (key, _, end) in enumerate(order):
        stop = order[i + 1][1] if i + 1 < len(order) else len(text)
        parts[key] = text[end:stop].strip()
    fence = _FENCE_RE.search(parts["formal"])
    if fence is None:
        raise MalformedAnswer("no fenced ```lean block under `Formal proof:`")
    formal = fence.group("code").strip("\n").rstrip()
    for key, name in _SECTIONS:
        if not (formal if key == "formal" else parts[key]).strip():
            raise MalformedAnswer(f"the `{name}:` section is empty")
    return Answer(parts["problem"], parts["informal"], formal)


def render_answer(answer: Answer) -> str:
    """An answer in the format `parse_answer` reads (what the revise prompt shows as the previous answer)."""
    return (f"Problem:\n{answer.problem}\n\nInformal proof:\n{answer.informal}\n\n"
            f"Formal proof:\n```lean\n{answer.formal}\n```\n")


@dataclass(frozen=True)
class LeanFile:
    """The Lean block split as the verifiers take it: `item.header` = its leading import lines (or the
    configured default header when it has none), `item.body` = the rest; `offset` = lines of the block
    before the body, so block line = body line + offset."""

    item: LeanItem
    offset: int
    statement: str | None  # the theorem's statement up to `:= by`, None when there is no declaration


def lean_file(code: str, default_header: str, item_id: str = "") -> LeanFile:
    lines = code.split("\n")
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("import ")):
        i += 1
    header = "\n".join(x.strip() for x in lines[:i] if x.strip())
    body = "\n".join(lines[i:]).rstrip()
    m = _STATEMENT_RE.search(body)
    statement = " ".join(m.group(0).split()) if m else None
    if header:
        return LeanFile(LeanItem(body, header, item_id), i, statement)
    # No imports written: the default header is added, and the block's lines are the body's lines (a blank
    # line the author left at the top still counts).
    return LeanFile(LeanItem(body, default_header, item_id), i, statement)


def feedback(outcome: LeanOutcome, offset: int) -> str:
    """Lean's messages and sorries, sorted by position, one `- line L, column C: KIND: text` entry each
    (continuation lines indented), with lines counted in the author's Lean block."""
    entries: list[tuple[int, int, str, str]] = []
    for m in outcome.messages:
        if m.severity in ("error", "warning"):
            entries.append((m.pos.line + offset, m.pos.column, m.severity, m.data))
    for s in outcome.sorries:
        if s.pos is not None:
            entries.append((s.pos.line + offset, s.pos.column, "sorry", f"this `sorry` leaves the goal {s.goal}"))
    out = []
    for line, col, kind, data in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
        text = data.strip().replace("\n", "\n    ")
        out.append(f"- line {line}, column {col}: {kind}: {text}")
    return "\n".join(out)


FEEDBACK_LINE_RE = re.compile(r"^- line (?P<line>\d+), column (?P<col>\d+): (?P<kind>error|warning|sorry): ",
                              re.MULTILINE)
