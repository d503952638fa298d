"""Problems from a local JSONL, CSV or Parquet file, through a field mapping.

Reading (this module) is kept apart from judging records (`base.record_to_problem`). Locators:
`name.jsonl:line N` (1-based, as an editor shows it), `name.csv:row N` and `name.parquet:row N`
(0-based data rows, header excluded, as a dataframe index shows it).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from storage.errors import SourceError
from tasks.problem import Quarantined
from tasks.sources.base import AnswerFormat, FieldMapping, SourceResult, collect

FileFormat = Literal["jsonl", "parquet", "csv"]
_SUFFIXES: dict[str, FileFormat] = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class FileSourceConfig(BaseModel):
    """A local file of problems: one record per JSON line, CSV row or Parquet row."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["file"] = "file"
    path: str = Field(..., min_length=1, description="Path of the file.")
    format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="File format; `auto` picks it from the suffix (.jsonl, .parquet/.pq, .csv).")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Which fields hold what.")
    answer_format: AnswerFormat = Field(
        "plain", description="`plain`: the answer field is the gold as is; `gsm8k`: a GSM8K solution "
        "ending in `#### N`, whose N becomes the gold and whose lines become `reference_steps`.")
    limit: int | None = Field(None, ge=1, description="Load at most this many problems; None: all.")
    name: str | None = Field(None, description="Source name stored with each problem; default: file stem.")


def resolve_format(cfg: FileSourceConfig) -> FileFormat:
    if cfg.format != "auto":
        return cfg.format
    suffix = Path(cfg.path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise SourceError(
            f"Cannot tell the format of {cfg.path!r} from its suffix {suffix!r}; set `format` to one of "
            "jsonl, parquet, csv.", field="source.format", value=cfg.path)
    return _SUFFIXES[suffix]


def _jsonl_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # Bytes decoded line by line, so one undecodable or malformed line is quarantined, not fatal.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            locator = f"{path.name}:line {lineno}"
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue  # blank lines (a trailing newline) are not records
                yield locator, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield locator, Quarantined(source=source, record=locator, field=None,
                                           reason=f"{locator}: not valid JSON: {exc}",
                                           raw=raw.decode("utf-8", "replace"))


def _csv_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is quarantined with its
    # locator instead of a UnicodeDecodeError ending the whole read.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for index, row in enumerate(csv.DictReader(fh)):
            locator = f"{path.name}:row {index}"
            bad = next((k for k, v in row.items() if isinstance(v, str) and _undecodable(v)), None)
            if bad is not None:
                raw = ",".join(v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                               for v in row.values() if isinstance(v, str))
                yield locator, Quarantined(source=source, record=locator, field=bad,
                                           reason=f"{locator}: field {bad!r}: not valid UTF-8", raw=raw)
                continue
            yield locator, row


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    index = 0
    for batch in pq.ParquetFile(path).iter_batches():  # batches keep memory flat on large files
        for row in batch.to_pylist():
            yield f"{path.name}:row {index}", row
            index += 1


def _check_columns(path: Path, columns: list[str], fields: FieldMapping) -> None:
    # A mapping naming a column the file does not have is a config mistake, not N bad records.
    wanted = {"question": fields.question, "answer": fields.answer}
    for role, column in wanted.items():
        if column is not None and column not in columns:
            raise SourceError(
                f"{path.name} has no column {column!r} for the {role}; its columns are {columns}. "
                f"Set `source.fields.{role}` to one of them.", field=f"source.fields.{role}", value=column)


def verify_file_source(cfg: FileSourceConfig) -> FileFormat:
    """The checks that need the file but not its records (exists, format, mapped columns): cheap enough to
    run before a build starts any work. Raises SourceError naming the config field."""
    path = Path(cfg.path)
    fmt = resolve_format(cfg)
    if not path.is_file():
        raise SourceError(f"`source.path`: source file {str(path)!r} does not exist or is not a file.",
                          field="source.path", value=cfg.path)
    try:
        if fmt == "csv":
            with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
                header = next(csv.reader(fh), [])
            _check_columns(path, header, cfg.fields)
        elif fmt == "parquet":
            _check_columns(path, pq.read_schema(path).names, cfg.fields)
    except SourceError:
        raise
    except (OSError, csv.Error, pa.ArrowException) as exc:
        raise SourceError(f"`source.path`: cannot read source file {str(path)!r} as {fmt}: {exc}",
                          field="source.path", value=cfg.path) from exc
    return fmt


def load_file_source(cfg: FileSourceConfig) -> SourceResult:
    """Load the file; raises SourceError if it cannot be read at all, quarantines bad records."""
    fmt = verify_file_source(cfg)
    path = Path(cfg.path)
    source = cfg.name or path.stem
    try:
        if fmt == "jsonl":
            records = _jsonl_records(path, source)
        elif fmt == "csv":
            records = _csv_records(path, source)
        else:
            records = _parquet_records(path)
        result = collect(records, source=source, fields=cfg.fields, answer_format=cfg.answer_format,
                         limit=cfg.limit)
    except SourceError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise SourceError(f"`source.path`: cannot read source file {str(path)!r} as {fmt}: {exc}",
                          field="source.path", value=cfg.path) from exc
    return result
