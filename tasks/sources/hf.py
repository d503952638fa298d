"""Problems from a Hugging Face dataset: a local folder/file saved with `datasets`, or a Hub name.

Hub names only work where the Hub is reachable; offline a clear SourceError says so. Records go through
the same `record_to_problem` rules as files, with locators `name[split]:row N`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import SourceError
from tasks.sources.base import AnswerFormat, FieldMapping, SourceResult, collect, unrepresentable


class HFSourceConfig(BaseModel):
    """A `datasets` dataset: `path` is a Hub name (`openai/gsm8k`) or a local folder/file."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf"] = "hf"
    path: str = Field(..., min_length=1, description="Hub name or local path of the dataset.")
    name: str | None = Field(None, description="Dataset config name (e.g. `main` for gsm8k).")
    split: str = Field("test", description="Split to read.")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Which fields hold what.")
    answer_format: AnswerFormat = Field("plain", description="`plain` or `gsm8k` (`#### N` answers).")
    limit: int | None = Field(None, ge=1, description="Load at most this many problems; None: all.")
    revision: str | None = Field(None, description="Hub revision (commit or tag) for reproducible builds.")


def _open(cfg: HFSourceConfig) -> Any:
    import datasets

    local = Path(cfg.path)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(local))  # saved with save_to_disk
            return ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
        if local.is_file():
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
            if fmt is None:
                raise SourceError(f"`source.path`: {cfg.path!r} has an unsupported file suffix {local.suffix!r}; use "
                                  f".jsonl, .json, .parquet or .csv.", field="source.path")
            return datasets.load_dataset(fmt, data_files={cfg.split: str(local)}, split=cfg.split)
        return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, revision=cfg.revision)
    except SourceError:
        raise
    except Exception as exc:  # datasets raises many types (connection, missing split, bad config name)
        raise SourceError(f"`source.path`: cannot load Hugging Face dataset {cfg.path!r} (split {cfg.split!r}): "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}", field="source.path",
                          value=cfg.path) from exc


def load_hf_source(cfg: HFSourceConfig) -> SourceResult:
    ds = _open(cfg)
    label = f"{Path(cfg.path).name or cfg.path}[{cfg.split}]"
    missing = [c for c in (cfg.fields.question, cfg.fields.answer) if c is not None and c not in ds.column_names]
    if missing:
        raise SourceError(f"`source.fields`: {label} has no column(s) {missing}; its columns are {ds.column_names}.",
                          field="source.fields", value=missing)

    def records() -> Iterator[tuple[str, Any]]:
        for i, row in enumerate(ds):
            yield f"{label}:row {i}", row

    if unrepresentable(cfg.path) is not None:  # every problem_id hashes the source name
        raise SourceError("`source.path` is not valid Unicode text.", field="source.path")
    try:
        return collect(records(), source=cfg.path, fields=cfg.fields, answer_format=cfg.answer_format,
                       limit=cfg.limit)
    except Exception as exc:  # decoding a row (Arrow, an image or audio feature) failed: the dataset is unreadable
        raise SourceError(f"`source.path`: cannot read the rows of {label}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}", field="source.path", value=cfg.path) from exc
