"""Answer formats: how a record's gold answer is read (`plain`, or GSM8K's reference steps ending in `#### N`).

A GSM8K answer is reference steps, one per line, with calculator annotations `<<48/2=24>>`, then a last
line `#### 72`. Every source reads answers through `parse_answer` in `base.py`, which imports this module;
nothing here imports a source.
"""

from __future__ import annotations

import re

_CALC_RE = re.compile(r"<<([^<>]*)>>")
_MARKER = "####"
# Gold answers are plain numbers once thousands separators are gone (a few are negative or decimal).
_GOLD_RE = re.compile(r"-?\d+(?:\.\d+)?")


def strip_calculator_annotations(text: str) -> str:
    """`text` without its `<<expr=result>>` annotations (the visible result after them stays)."""
    return _CALC_RE.sub("", text)


def calculator_annotations(text: str) -> list[tuple[str, str]]:
    """The (expression, result) pairs of the `<<expr=result>>` annotations in `text`, in order."""
    pairs: list[tuple[str, str]] = []
    for body in _CALC_RE.findall(text):
        expr, eq, result = body.rpartition("=")
        if eq:  # an annotation without "=" is not a calculation; skip it rather than guess
            pairs.append((expr.strip(), result.strip()))
    return pairs


def parse_gsm8k_answer(text: str) -> tuple[str, list[str]]:
    """(gold final answer, reference steps) of a GSM8K answer.

    The gold is the text after the last `#### ` with commas removed and must be a number; the steps are
    the non-empty lines before it, without calculator annotations. Raises ValueError otherwise.
    """
    head, marker, tail = text.rpartition(_MARKER)
    if not marker:
        raise ValueError(f"no {_MARKER!r} line with the final answer")
    gold = tail.strip().replace(",", "")
    if not _GOLD_RE.fullmatch(gold):
        raise ValueError(f"final answer {tail.strip()!r} after {_MARKER!r} is not a number")
    steps = [line.strip() for line in strip_calculator_annotations(head).splitlines() if line.strip()]
    return gold, steps
