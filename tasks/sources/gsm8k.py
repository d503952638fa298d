"""GSM8K: its answer format and a loader for its JSONL files.

A GSM8K answer is reference steps, one per line, with calculator annotations `<<48/2=24>>`, then a last
line `#### 72`. The loader is the file source with the GSM8K answer format, so GSM8K records are checked
and quarantined by exactly the same rules as any other file.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.sources.base import FieldMapping, SourceResult
from tasks.sources.files import FileSourceConfig, load_file_source, verify_file_source

SOURCE = "gsm8k"

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


class GSM8KSourceConfig(BaseModel):
    """GSM8K in its original JSONL form (`question`, `answer` with `#### N`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["gsm8k"] = "gsm8k"
    path: str = Field(..., min_length=1, description="Path of a GSM8K JSONL file (e.g. `test.jsonl`).")
    limit: int | None = Field(None, ge=1, description="Load at most this many problems; None: all.")


def _file_config(cfg: GSM8KSourceConfig) -> FileSourceConfig:
    return FileSourceConfig(path=cfg.path, format="jsonl", fields=FieldMapping(question="question", answer="answer"),
                            answer_format="gsm8k", limit=cfg.limit, name=SOURCE)


def verify_gsm8k(cfg: GSM8KSourceConfig) -> None:
    verify_file_source(_file_config(cfg))


def load_gsm8k(cfg: GSM8KSourceConfig) -> SourceResult:
    """Problems with `source="gsm8k"`, the gold number as answer, reference steps and calculator calls in
    metadata. Malformed records are quarantined; an unreadable file raises SourceError."""
    return load_file_source(_file_config(cfg))
