"""The problem record every source yields, and the quarantine record for what it cannot use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from storage.schema import problem_id


@dataclass(frozen=True)
class Problem:
    source: str
    question: str
    answer: str | None = None
    domain: str = "math"
    header: str | None = None
    formal_statement: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def problem_id(self) -> str:
        # Cached (in the instance's __dict__, which a frozen dataclass still has): read per node and per pair.
        return problem_id(self.source, self.question)

    def to_row(self) -> dict[str, Any]:
        return {
            "problem_id": self.problem_id,
            "source": self.source,
            "domain": self.domain,
            "question": self.question,
            "answer": self.answer,
            "header": self.header,
            "formal_statement": self.formal_statement,
            "metadata": json.dumps(self.metadata, sort_keys=True, ensure_ascii=False),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Problem":
        return cls(
            source=row["source"],
            question=row["question"],
            answer=row.get("answer"),
            domain=row.get("domain") or "math",
            header=row.get("header"),
            formal_statement=row.get("formal_statement"),
            metadata=json.loads(row.get("metadata") or "{}"),
        )


@dataclass(frozen=True)
class Quarantined:
    """A source record that could not become a problem, with where it came from and why."""

    source: str
    record: str  # locator: "file.jsonl:line 12", "dataset[split][idx]"
    field: str | None
    reason: str
    raw: str = ""

    def to_row(self) -> dict[str, Any]:
        # Written to the manifest (UTF-8 JSON): text a record could not encode is shown as escapes.
        return {"source": _utf8(self.source), "record": _utf8(self.record),
                "field": _utf8(self.field) if self.field is not None else None, "reason": _utf8(self.reason),
                "raw": _utf8(self.raw[:2000])}


def _utf8(text: str) -> str:
    """`text` with lone surrogates written as `\\udXXX` escapes, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
