"""What every problem source shares: the result type, the field mapping, and the one function that turns a
raw record into a `Problem` or a `Quarantined` row.

Every source (files, GSM8K, Hugging Face) goes through `record_to_problem`, so a record is accepted or
quarantined by the same rules whatever it was read from. A bad record never raises: it is quarantined
with its locator and the field at fault, and the good records around it still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from tasks.problem import Problem, Quarantined
from tasks.sources.answers import calculator_annotations, parse_gsm8k_answer

AnswerFormat = Literal["plain", "gsm8k"]


@dataclass
class SourceResult:
    """The problems a source yielded, what it quarantined, and how many duplicate questions it dropped."""

    problems: list[Problem]
    quarantined: list[Quarantined]
    duplicates: int = 0


class FieldMapping(BaseModel):
    """Which record fields hold the question, the gold answer, an ID and extra metadata."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field("question", min_length=1, description="Field holding the question text (required).")
    answer: str | None = Field(
        "answer",
        description="Field holding the gold answer. None: the source has no gold answers (records are kept "
        "without one). When set, a record with a missing or unparseable answer is quarantined.",
    )
    id: str | None = Field(
        None, description="Field holding the record's own ID; kept as `metadata['source_id']` when present."
    )
    metadata: list[str] = Field(
        default_factory=list, description="Extra fields copied into `Problem.metadata` under their own names."
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _jsonable(value: Any) -> Any:
    # Problem.to_row() writes metadata with json.dumps and no fallback, so anything exotic that a Parquet
    # or HF record can hold (dates, decimals, bytes) is stored as its text instead of failing later.
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _raw(record: Any) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(record)


def unrepresentable(value: Any) -> str | None:
    """Why `value` (a field of a record, nested or not) cannot be stored as UTF-8 text in Parquet and JSON,
    or None when it can. JSON's `\\ud800` escapes and CSV's surrogateescape give strings holding lone
    surrogates: valid to Python, but no UTF-8 encoder takes them (problem IDs, Parquet, the manifest)."""
    stack = [value]
    while stack:  # iterative: nesting depth is the record's to choose
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"is not valid Unicode text: it holds {item[exc.start:exc.end]!r} at character "
                        f"{exc.start} (a lone surrogate, e.g. a JSON \\ud800 escape or undecodable bytes)")
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def parse_answer(value: Any, answer_format: AnswerFormat) -> tuple[str, dict[str, Any]]:
    """The gold answer string and any metadata the format carries. Raises ValueError when unparseable."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ValueError("is empty")
    if answer_format == "plain":
        return text, {}
    if answer_format == "gsm8k":
        gold, steps = parse_gsm8k_answer(text)
        calc = [[expr, result] for expr, result in calculator_annotations(text)]
        return gold, {"reference_steps": steps, "calculator": calc}
    raise ValueError(f"unknown answer format {answer_format!r}")


def record_to_problem(
    record: Any,
    *,
    source: str,
    locator: str,
    fields: FieldMapping,
    answer_format: AnswerFormat = "plain",
) -> Problem | Quarantined:
    """One raw record to a `Problem`, or to a `Quarantined` row naming `locator` and the field at fault."""

    def quarantine(field_name: str | None, why: str) -> Quarantined:
        where = f"{locator}: field {field_name!r}" if field_name else locator
        return Quarantined(source=source, record=locator, field=field_name, reason=f"{where}: {why}",
                           raw=_raw(record))

    if not isinstance(record, Mapping):
        return quarantine(None, f"record is a {type(record).__name__}, not an object with fields")

    question = record.get(fields.question)
    for name in (fields.question, fields.answer, fields.id, *fields.metadata):
        why = unrepresentable(record.get(name)) if name is not None else None
        if why is not None:
            return quarantine(name, why)
    if question is None:
        return quarantine(fields.question, "question is missing")
    if not isinstance(question, str):
        return quarantine(fields.question, f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        return quarantine(fields.question, "question is empty")

    answer: str | None = None
    metadata: dict[str, Any] = {}
    if fields.answer is not None:
        value = record.get(fields.answer)
        if _is_missing(value):
            return quarantine(fields.answer, "answer is missing or empty")
        try:
            answer, metadata = parse_answer(value, answer_format)
        except ValueError as exc:
            return quarantine(fields.answer, f"answer cannot be parsed as {answer_format!r}: {exc}")

    if fields.id is not None and not _is_missing(record.get(fields.id)):
        metadata["source_id"] = str(record[fields.id])
    for name in fields.metadata:
        if name in record:
            metadata[name] = _jsonable(record[name])

    # Surrounding whitespace is form, not content: stripping it keeps problem_id stable across sources.
    return Problem(source=source, question=question.strip(), answer=answer, metadata=metadata)


def collect(
    records: Iterable[tuple[str, Any]],
    *,
    source: str,
    fields: FieldMapping,
    answer_format: AnswerFormat = "plain",
    limit: int | None = None,
) -> SourceResult:
    """Run `record_to_problem` over (locator, record) pairs, deduplicating by problem_id.

    `records` may also yield ready `Quarantined` rows (e.g. a JSON line that did not parse). Reading stops
    once `limit` problems have been collected, so a limit counts usable problems, not raw records.
    """
    problems: list[Problem] = []
    quarantined: list[Quarantined] = []
    seen: set[str] = set()
    duplicates = 0
    for locator, record in records:
        if limit is not None and len(problems) >= limit:
            break
        try:
            out = record if isinstance(record, Quarantined) else record_to_problem(
                record, source=source, locator=locator, fields=fields, answer_format=answer_format)
            if isinstance(out, Problem):
                out.problem_id  # hashes the text: must work now, not in a shard task
        except (ValueError, TypeError, RecursionError, UnicodeError) as exc:
            # A record no rule above foresaw still costs only itself, never the build.
            out = Quarantined(source=source, record=locator, field=None,
                              reason=f"{locator}: cannot be used: {type(exc).__name__}: {exc}", raw=_raw(record))
        if isinstance(out, Quarantined):
            quarantined.append(out)
        elif out.problem_id in seen:
            duplicates += 1  # first occurrence wins: same source + question is the same problem
        else:
            seen.add(out.problem_id)
            problems.append(out)
    return SourceResult(problems=problems, quarantined=quarantined, duplicates=duplicates)
