"""Formal (Lean 4) problem sources: miniF2F statements and the LeanDojo Benchmark's traced proofs.

Both yield problems with `domain="lean"`. miniF2F (the Lean 4 port, one JSON line per statement with
`name`, `split`, `header`, `formal_statement`) fills `header` and `formal_statement`; the statement ends
with `:= by`, so a proof attempt is the statement followed by its tactics. The LeanDojo Benchmark (a JSON
list of theorems with `url`, `commit`, `file_path`, `full_name` and `traced_tactics`, each `{tactic,
state_before, state_after}`) needs no LeanDojo to read: each theorem becomes a problem whose question is
its goal as Lean prints it, with the human proof's tactics as `reference_steps` and the states around
them as `states`. Bad records are quarantined with their locator, like every source's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import SourceError
from tasks.problem import Problem, Quarantined
from tasks.sources.base import SourceResult, unrepresentable
from tasks.sources.files import _jsonl_records

MINIF2F = "minif2f"
LEANDOJO = "leandojo"


class MiniF2FSourceConfig(BaseModel):
    """miniF2F in Lean 4 (JSONL: name, split, header, formal_statement)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["minif2f"] = "minif2f"
    path: str = Field(..., min_length=1, description="Path of the miniF2F Lean 4 JSONL file.")
    split: Literal["all", "test", "valid"] = Field("all", description="Which split to load.")
    limit: int | None = Field(None, ge=1, description="Load at most this many problems; None: all.")


class LeanDojoBenchmarkSourceConfig(BaseModel):
    """The LeanDojo Benchmark (Lean 4): a JSON list of theorems with traced tactics."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["leandojo-benchmark"] = "leandojo-benchmark"
    path: str = Field(..., min_length=1, description="Path of a split file, e.g. `random/test.json`.")
    limit: int | None = Field(None, ge=1, description="Load at most this many problems; None: all.")


def _text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _finish(items: Iterator[tuple[str, Problem | Quarantined]], limit: int | None) -> SourceResult:
    problems: list[Problem] = []
    quarantined: list[Quarantined] = []
    seen: set[str] = set()
    duplicates = 0
    for locator, out in items:
        if limit is not None and len(problems) >= limit:
            break
        if isinstance(out, Problem):
            # Text no UTF-8 encoder takes (a JSON \\ud800 escape) costs only its record, never the build.
            bad = next(((name, why) for name, value in (("question", out.question), ("header", out.header),
                                                        ("formal_statement", out.formal_statement),
                                                        ("metadata", out.metadata))
                        if (why := unrepresentable(value)) is not None), None)
            if bad is not None:
                out = Quarantined(out.source, locator, bad[0], f"{locator}: field {bad[0]!r}: {bad[1]}")
        if isinstance(out, Quarantined):
            quarantined.append(out)
        elif out.problem_id in seen:
            duplicates += 1
        else:
            seen.add(out.problem_id)
            problems.append(out)
    return SourceResult(problems=problems, quarantined=quarantined, duplicates=duplicates)


def _check_path(path: str, field: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"`{field}`: {path!r} is not a file; give the path of the downloaded file.",
                          field=field, value=path)
    return p


def verify_minif2f(cfg: MiniF2FSourceConfig) -> None:
    _check_path(cfg.path, "source.path")


def load_minif2f(cfg: MiniF2FSourceConfig) -> SourceResult:
    path = _check_path(cfg.path, "source.path")

    def problems() -> Iterator[tuple[str, Problem | Quarantined]]:
        for locator, record in _jsonl_records(path, MINIF2F):
            if isinstance(record, Quarantined):
                yield locator, record
                continue

            def bad(field: str | None, why: str) -> Quarantined:
                where = f"{locator}: field {field!r}" if field else locator
                return Quarantined(MINIF2F, locator, field, f"{where}: {why}", json.dumps(record, ensure_ascii=False))

            if not isinstance(record, dict):
                yield locator, bad(None, "record is not an object")
                continue
            missing = next((k for k in ("name", "header", "formal_statement") if _text(record, k) is None), None)
            if missing:
                yield locator, bad(missing, f"{missing} is missing or empty")
                continue
            split = record.get("split")
            if cfg.split != "all" and split != cfg.split:
                continue
            statement = record["formal_statement"].strip()
            yield locator, Problem(source=MINIF2F, question=statement, answer=None, domain="lean",
                                   header=record["header"].strip(), formal_statement=statement,
                                   metadata={"name": record["name"], "split": split})

    try:
        return _finish(problems(), cfg.limit)
    except OSError as exc:
        raise SourceError(f"`source.path`: cannot read {cfg.path!r}: {exc}", field="source.path", value=cfg.path) from exc


def verify_leandojo_benchmark(cfg: LeanDojoBenchmarkSourceConfig) -> None:
    _check_path(cfg.path, "source.path")


def load_leandojo_benchmark(cfg: LeanDojoBenchmarkSourceConfig) -> SourceResult:
    path = _check_path(cfg.path, "source.path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"`source.path`: {cfg.path!r} is not a LeanDojo Benchmark JSON file: {exc}",
                          field="source.path", value=cfg.path) from exc
    if not isinstance(data, list):
        raise SourceError(f"`source.path`: {cfg.path!r} holds a {type(data).__name__}, not a list of theorems",
                          field="source.path", value=cfg.path)

    def problems() -> Iterator[tuple[str, Problem | Quarantined]]:
        for i, record in enumerate(data):
            locator = f"{path.name}[{i}]"

            def bad(field: str | None, why: str) -> Quarantined:
                where = f"{locator}: field {field!r}" if field else locator
                return Quarantined(LEANDOJO, locator, field, f"{where}: {why}",
                                   json.dumps(record, ensure_ascii=False, default=str))

            if not isinstance(record, dict):
                yield locator, bad(None, "record is not an object")
                continue
            missing = next((k for k in ("full_name", "file_path") if _text(record, k) is None), None)
            if missing:
                yield locator, bad(missing, f"{missing} is missing or empty")
                continue
            tactics = record.get("traced_tactics")
            if not isinstance(tactics, list) or not tactics:
                yield locator, bad("traced_tactics", "no traced tactics (nothing to learn steps from)")
                continue
            broken = next((j for j, t in enumerate(tactics) if not isinstance(t, dict) or any(
                not isinstance(t.get(k), str) for k in ("tactic", "state_before", "state_after"))), None)
            if broken is not None:
                yield locator, bad("traced_tactics", f"tactic {broken} lacks tactic/state_before/state_after")
                continue
            goal = tactics[0]["state_before"].strip()
            yield locator, Problem(
                source=LEANDOJO, question=f"{record['full_name']}\n{goal}", answer=None, domain="lean",
                metadata={"full_name": record["full_name"], "file_path": record["file_path"],
                          "url": record.get("url"), "commit": record.get("commit"),
                          "reference_steps": [t["tactic"] for t in tactics],
                          "states": [[t["state_before"], t["state_after"]] for t in tactics]})

    return _finish(problems(), cfg.limit)
