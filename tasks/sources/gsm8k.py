"""GSM8K: a loader for its JSONL files.

The loader is the file source with the GSM8K answer format (`tasks/sources/answers.py`), so GSM8K records
are checked and quarantined by exactly the same rules as any other file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.sources.base import FieldMapping, SourceResult
from tasks.sources.files import FileSourceConfig, load_file_source, verify_file_source

SOURCE = "gsm8k"


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
