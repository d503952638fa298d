"""Problems from a local JSONL, JSON, CSV or Parquet file, through a field mapping.

Reading (this module) is kept apart from judging records (`base.record_to_problem`). Locators:
`name.jsonl:line N` (1-based, as an editor shows it), `name.csv:row N`, `name.parquet:row N` and
`name.json:record N` (0-based data rows, header excluded, as a dataframe index shows it). A line, row or
record that cannot be decoded is quarantined with its locator; only a file that cannot be read at all (or a
`.json` file that is not one JSON array) fails the source with a SourceError naming `source.path`.
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
from tasks.sources.base import AnswerFormat, FieldMapping, SourceResult, collect, unrepresentable

FileFormat = Literal["jsonl", "json", "parquet", "csv"]
_SUFFIXES: dict[str, FileFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                                    ".pq": "parquet", ".csv": "csv"}


class FileSourceConfig(BaseModel):
    """A local file of problems: one record per JSON line, CSV row, Parquet row or element of a JSON array."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["file"] = "file"
    path: str = Field(..., min_length=1, description="Path of the file.")
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = Field(
        "auto", description="File format; `auto` picks it from the suffix (.jsonl/.ndjson, .json: one array of "
        "records, .parquet/.pq, .csv).")
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
            f"`source.format`: cannot tell the format of {cfg.path!r} from its suffix {suffix!r}; set "
            "`source.format` to one of jsonl, json, parquet, csv.", field="source.format", value=cfg.path)
    return _SUFFIXES[suffix]


def _jsonl_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # Bytes decoded line by line, so one undecodable or malformed line is quarantined, not fatal.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            locator = f"{path.name}:line {lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is form, not content
                if not text.strip():
                    continue  # blank lines (a trailing newline) are not records
                yield locator, json.loads(text)
            # ValueError: bad UTF-8, bad JSON, an integer too long to convert; RecursionError: nesting too deep
            except (ValueError, RecursionError) as exc:
                yield locator, Quarantined(source=source, record=locator, field=None,
                                           reason=f"{locator}: not valid JSON: {_one_line(exc)}",
                                           raw=raw.decode("utf-8", "replace"))


def _json_records(path: Path, cfg: FileSourceConfig) -> Iterator[tuple[str, Any]]:
    # One document: it parses whole or not at all, so a broken file is a SourceError, its elements records.
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"`source.path`: {str(path)!r} is not valid JSON: {_one_line(exc)}; a .json source "
                          f"is one array of records (use .jsonl for one record per line).",
                          field="source.path", value=cfg.path) from None
    if not isinstance(data, list):
        raise SourceError(f"`source.path`: {str(path)!r} holds a JSON {type(data).__name__}, not an array of "
                          f"records; a .json source is one array of objects.", field="source.path", value=cfg.path)
    for index, record in enumerate(data):
        yield f"{path.name}:record {index}", record


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _csv_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is quarantined with its
    # locator instead of a UnicodeDecodeError ending the whole read.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        index = errors = 0
        while True:
            locator = f"{path.name}:row {index}"
            try:
                row = next(reader)
                errors = 0
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a field over csv's size limit: the reader goes on after it
                errors += 1
                if errors > 100:
                    raise  # one error after another: this is not a CSV file
                yield locator, Quarantined(source=source, record=locator, field=None,
                                           reason=f"{locator}: not a valid CSV row: {_one_line(exc)}")
                index += 1
                continue
            index += 1
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


def _parquet_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    index = 0
    for batch in pq.ParquetFile(path).iter_batches():  # batches keep memory flat on large files
        try:
            rows = batch.to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):
            rows = None  # some value has no Python form (invalid UTF-8 in a string column, a date out of range)
        for i in range(batch.num_rows):
            locator = f"{path.name}:row {index}"
            index += 1
            if rows is not None:
                yield locator, rows[i]
                continue
            row, bad = {}, None
            for name, column in zip(batch.schema.names, batch.columns):
                try:
                    row[name] = column.slice(i, 1).to_pylist()[0]
                except (ValueError, OverflowError, pa.ArrowException) as exc:
                    bad = bad or (name, exc)
            if bad is None:
                yield locator, row
            else:
                yield locator, Quarantined(source=source, record=locator, field=bad[0],
                                           reason=f"{locator}: field {bad[0]!r}: cannot be read: {_one_line(bad[1])}")


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
            with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
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
    if unrepresentable(source) is not None:  # every problem_id hashes the source name
        raise SourceError(f"`source.name`: the source name taken from the file name {str(path)!r} is not valid "
                          f"Unicode; set `source.name`.", field="source.name", value=cfg.path)
    try:
        if fmt == "jsonl":
            records = _jsonl_records(path, source)
        elif fmt == "json":
            records = _json_records(path, cfg)
        elif fmt == "csv":
            records = _csv_records(path, source)
        else:
            records = _parquet_records(path, source)
        result = collect(records, source=source, fields=cfg.fields, answer_format=cfg.answer_format,
                         limit=cfg.limit)
    except SourceError:
        raise
    # ValueError/OverflowError: Parquet values Python cannot hold (dates out of range, ...)
    except (OSError, ValueError, OverflowError, csv.Error, pa.ArrowException) as exc:
        raise SourceError(f"`source.path`: cannot read source file {str(path)!r} as {fmt}: {_one_line(exc)}",
                          field="source.path", value=cfg.path) from exc
    return result
