"""Problem sources by config `kind`: one typed record per source, the shape of every stepforge registry
(see `storage/exports/__init__.py`). A new source is one module (a config model whose `kind` field is a
one-value `Literal`, and a loader) plus one line in `SOURCES`; `flows/config.py` builds its `source` union
from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from tasks.sources.base import SourceResult
from tasks.sources.files import FileSourceConfig, load_file_source, verify_file_source
from tasks.sources.gsm8k import GSM8KSourceConfig, load_gsm8k, verify_gsm8k
from tasks.sources.hf import HFSourceConfig, load_hf_source
from tasks.sources.lean import (LeanDojoBenchmarkSourceConfig, MiniF2FSourceConfig, load_leandojo_benchmark,
                                load_minif2f, verify_leandojo_benchmark, verify_minif2f)
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from tasks.sources.synthetic_lean import SyntheticLeanSourceConfig, load_synthetic_lean

__all__ = ["SOURCES", "DEFAULT", "TAG", "Source"]

TAG = "kind"
DEFAULT = "synthetic"


@dataclass(frozen=True)
class Source:
    """`load(cfg)` reads the problems, quarantining bad records; `check(cfg)`, where given, is the preflight:
    what is cheap to check before any work (the file exists, its columns match the mapping), raising
    `SourceError` naming the `source.*` field. `domain`: the `Problem.domain` of its problems
    (`tasks/domains.py`: what the outcome verifier checks)."""

    name: str
    config: type[BaseModel]
    load: Callable[[Any], SourceResult]
    check: Callable[[Any], object] | None = None
    domain: str = "math"

    def verify(self, cfg: Any) -> None:
        if self.check is not None:
            self.check(cfg)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("synthetic", SyntheticSourceConfig, load_synthetic),
        Source("file", FileSourceConfig, load_file_source, check=verify_file_source),
        Source("gsm8k", GSM8KSourceConfig, load_gsm8k, check=verify_gsm8k),
        Source("hf", HFSourceConfig, load_hf_source),
        Source("synthetic-lean", SyntheticLeanSourceConfig, load_synthetic_lean, domain="lean"),
        Source("minif2f", MiniF2FSourceConfig, load_minif2f, check=verify_minif2f, domain="lean"),
        Source("leandojo-benchmark", LeanDojoBenchmarkSourceConfig, load_leandojo_benchmark,
               check=verify_leandojo_benchmark, domain="lean"),
    )
}
