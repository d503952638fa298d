"""The arithmetic step check on real model solutions: how many GSM8K solutions it flags, and how many of
the flagged ones OpenAI's labels call wrong (`is_correct = false`).

On all 5,276 solutions of `example_model_solutions.jsonl` (4 models x 1,319 problems), each solution is
split into steps on newlines and every step checked; a solution is flagged when any step is `invalid`.
Rows: the verifier as configured by default, a variant that accepts whole-number rounding, annotations
only, inline text only, and a plain annotation checker for reference (evaluates `<<lhs=rhs>>` made of
numbers and `+-*/()` only, compares as floats with tolerance 1e-6, ignores inline text).

    .venv/bin/python benchmarks/step_check_real.py [--data PATH] [--false-positives]

`--false-positives` lists every step that makes the default check flag a solution labelled correct, with the
equation it found false (benchmarks/NOTES-issue12.md sorts them into slips and conventions).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from verifiers.arith_check import ArithCheckConfig, check_step  # noqa: E402
from verifiers.base import Status  # noqa: E402

DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
_NUM = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*$")


def load(path: Path) -> list[tuple[str, bool]]:
    rows = [json.loads(line) for line in path.open()]
    return [(r[m]["solution"], bool(r[m]["is_correct"])) for r in rows for m in MODELS]


def _plain_value(expr: str) -> Fraction | None:
    """Exact value of `+-*/()`-and-numbers text by a tiny recursive-descent parser; None if anything else."""
    toks = re.findall(r"\d+(?:\.\d+)?|[-+*/()]|\S", expr.replace(",", "").replace(" ", ""))
    pos = 0

    def atom() -> Fraction:
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t == "(":
            v = add()
            if toks[pos] != ")":
                raise ValueError
            pos += 1
            return v
        if t == "-":
            return -atom()
        if not re.fullmatch(r"\d+(?:\.\d+)?", t):
            raise ValueError
        return Fraction(t)

    def mul() -> Fraction:
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] in "*/":
            op = toks[pos]
            pos += 1
            r = atom()
            v = v * r if op == "*" else v / r
        return v

    def add() -> Fraction:
        nonlocal pos
        v = mul()
        while pos < len(toks) and toks[pos] in "+-":
            op = toks[pos]
            pos += 1
            r = mul()
            v = v + r if op == "+" else v - r
        return v

    try:
        v = add()
        return v if pos == len(toks) else None
    except (ValueError, IndexError, ZeroDivisionError):
        return None


def plain_flags(solution: str) -> tuple[bool, int]:
    """(flagged, unparsed annotations) for the reference checker."""
    flagged, unparsed = False, 0
    for ann in re.findall(r"<<([^<>]*)>>", solution):
        if "=" not in ann:
            continue
        lhs, rhs = ann.rsplit("=", 1)
        lv = _plain_value(lhs)
        if lv is None or not _NUM.match(rhs.replace(",", "")):
            unparsed += 1
            continue
        # As floats with a small tolerance, like a calculator would compare: the reference checker.
        flagged = flagged or abs(float(lv) - float(Fraction(rhs.replace(",", "").strip()))) > 1e-6
    return flagged, unparsed


def run_verifier(data: list[tuple[str, bool]], cfg: ArithCheckConfig) -> dict:
    flagged = flagged_wrong = steps = error_steps = checked_steps = 0
    for solution, correct in data:
        statuses = []
        for step in solution.split("\n"):
            if not step.strip():
                continue
            status, _ = check_step(step, cfg)
            statuses.append(status)
        steps += len(statuses)
        error_steps += sum(s is Status.ERROR for s in statuses)
        checked_steps += sum(s.decided for s in statuses)
        if Status.INVALID in statuses:
            flagged += 1
            flagged_wrong += not correct
    return {"flagged": flagged, "wrong": flagged_wrong, "steps": steps, "unparsed": error_steps,
            "checked": checked_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--false-positives", action="store_true",
                    help="list the invalid steps of flagged solutions labelled is_correct = true")
    args = ap.parse_args()
    data = load(args.data)
    wrong_total = sum(not c for _, c in data)
    rows = []
    for label, cfg in [("arith-check (default)", ArithCheckConfig()),
                       ("  + whole-number rounding", ArithCheckConfig(integer_rounding=True)),
                       ("  annotations only", ArithCheckConfig(inline=False)),
                       ("  inline text only", ArithCheckConfig(annotations=False))]:
        t0 = time.perf_counter()
        r = run_verifier(data, cfg)
        r["seconds"] = time.perf_counter() - t0
        rows.append((label, r))
    t0 = time.perf_counter()
    flagged = wrong = unparsed = 0
    for solution, correct in data:
        f, u = plain_flags(solution)
        unparsed += u
        if f:
            flagged += 1
            wrong += not correct
    rows.append(("plain annotation checker", {"flagged": flagged, "wrong": wrong, "steps": None,
                                               "unparsed": unparsed, "checked": None,
                                               "seconds": time.perf_counter() - t0}))

    print(f"{len(data)} solutions ({wrong_total} labelled is_correct = false) from {args.data}")
    print()
    print("| checker | solutions flagged | flagged that are wrong | precision | steps checked | steps unparsed | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        prec = r["wrong"] / r["flagged"] if r["flagged"] else float("nan")
        checked = "" if r["checked"] is None else r["checked"]
        unparsed = f"{r['unparsed']}" + ("" if r["steps"] is not None else " annotations")
        print(f"| {label} | {r['flagged']} | {r['wrong']} | {prec:.1%} | {checked} | {unparsed} | {r['seconds']:.1f} |")
    if args.false_positives:
        print("\nflagged solutions labelled correct: their invalid steps (default config)")
        cfg = ArithCheckConfig()
        for solution, correct in data:
            if not correct:
                continue
            for step in solution.split("\n"):
                status, checks = check_step(step, cfg)
                if status is Status.INVALID:
                    bad = "; ".join(f"`{c.text}` ({c.why})" for c in checks if c.ok is False)
                    print(f"- {step.strip()}\n  false: {bad}")
    print()
    print("command: .venv/bin/python benchmarks/step_check_real.py" + (" --false-positives" if args.false_positives else ""))


if __name__ == "__main__":
    main()
