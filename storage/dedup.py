"""Deduplication and decontamination of texts (problems before search; export rows), with every dropped
record, its reason and its match reported.

- **Exact duplicates**: equal after normalisation (Unicode NFKC, case-folded, punctuation dropped,
  whitespace collapsed), by a hash of the normalised text.
- **Near duplicates**: MinHash signatures of word shingles, candidates from an LSH index (``datasketch``),
  each candidate confirmed by the exact Jaccard similarity of the shingle sets (so the decision is exact
  and does not depend on hash collisions). Items are taken in order: the first of a group is kept.
- **Decontamination** against benchmark files given by path (JSONL, JSON, CSV, Parquet): a text is
  contaminated when the share of its word n-grams that occur in one benchmark item reaches ``threshold``
  (or when it equals a benchmark item after normalisation). The match names the file and the record.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import ConfigError

__all__ = ["DedupConfig", "DecontamConfig", "Dropped", "normalize", "dedup", "BenchmarkIndex", "check_benchmarks",
           "decontaminate"]

_PUNCT_RE = re.compile(r"[^\w\s]+")
_QUESTION_FIELDS = ("question", "problem", "prompt", "input", "text")


class DedupConfig(BaseModel):
    """Exact and near-duplicate removal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Drop exact and near-duplicate records (the first of each group is kept).")
    near: bool = Field(True, description="Also drop near duplicates (MinHash LSH), not only exact ones.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity of word-shingle sets at or above "
                             "which two records are near duplicates.")
    shingle: int = Field(3, ge=1, le=10, description="Words per shingle for near-duplicate detection.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: fewer missed candidates).")


class DecontamConfig(BaseModel):
    """Decontamination against benchmark files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmarks: list[str] = Field(default_factory=list, description="Benchmark files (JSONL, JSON, CSV, Parquet) "
                                  "whose problems must not appear; empty: no decontamination.")
    field: str | None = Field(None, description="Field holding a benchmark record's text; default the first of "
                              "question, problem, prompt, input, text that a record has.")
    n: int = Field(8, ge=1, le=50, description="Words per n-gram.")
    threshold: float = Field(0.5, gt=0.0, le=1.0, description="Share of a record's n-grams found in one benchmark "
                             "item at or above which the record is contaminated.")


@dataclass(frozen=True)
class Dropped:
    """A dropped record: its id, why, what it matched and how closely."""

    id: str
    reason: str  # exact-duplicate | near-duplicate | contaminated
    match: str
    similarity: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "match": self.match, "similarity": round(self.similarity, 4)}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT_RE.sub(" ", text).split())


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _grams(words: Sequence[str], n: int) -> set[str]:
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup(items: Iterable[tuple[str, str]], cfg: DedupConfig) -> tuple[list[str], list[Dropped]]:
    """``(id, text)`` items → (ids kept, in order; dropped records). Deterministic for a given order."""
    from datasketch import MinHash, MinHashLSH

    kept: list[str] = []
    dropped: list[Dropped] = []
    seen: dict[str, str] = {}  # normalised digest -> first id
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
    shingles: dict[str, set[str]] = {}
    for item_id, text in items:
        norm = normalize(text)
        key = _digest(norm)
        if key in seen:
            dropped.append(Dropped(item_id, "exact-duplicate", seen[key], 1.0))
            continue
        if lsh is not None:
            grams = _grams(norm.split(), cfg.shingle)
            mh = MinHash(num_perm=cfg.num_perm, seed=1)
            for g in sorted(grams):
                mh.update(g.encode())
            # LSH gives candidates; the exact Jaccard decides, and the most similar earlier record is the match.
            best = max(((_jaccard(grams, shingles[c]), c) for c in lsh.query(mh)), default=None,
                       key=lambda t: (t[0], -kept.index(t[1])))
            if best is not None and best[0] >= cfg.threshold:
                dropped.append(Dropped(item_id, "near-duplicate", best[1], best[0]))
                continue
            lsh.insert(item_id, mh)
            shingles[item_id] = grams
        seen[key] = item_id
        kept.append(item_id)
    return kept, dropped


def _records(path: Path) -> Iterable[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from (data if isinstance(data, list) else data.get("data", [data]))
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as fh:
            yield from csv.DictReader(fh)
    else:
        raise ConfigError(f"benchmark file {str(path)!r}: unknown suffix {suffix!r}; use .jsonl, .json, .csv or "
                          ".parquet.", field="decontaminate.benchmarks", value=str(path))


_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")


def check_benchmarks(cfg: DecontamConfig) -> None:
    """The preflight's check of ``cfg.benchmarks`` (each is a file of a readable kind), before any work."""
    for raw_path in cfg.benchmarks:
        path = Path(raw_path)
        if not path.is_file():
            raise ConfigError(f"benchmark file {raw_path!r} does not exist: give a path to a JSONL, JSON, CSV or "
                              "Parquet file.", field="decontaminate.benchmarks", value=raw_path)
        if path.suffix.lower() not in _SUFFIXES:
            raise ConfigError(f"benchmark file {raw_path!r}: unknown suffix {path.suffix!r}; use .jsonl, .json, "
                              ".csv or .parquet.", field="decontaminate.benchmarks", value=raw_path)


class BenchmarkIndex:
    """The n-grams of every benchmark record, for ``decontaminate``."""

    def __init__(self, cfg: DecontamConfig) -> None:
        self.cfg = cfg
        self.items: list[tuple[str, int]] = []  # (locator, number of n-grams)
        self._by_gram: dict[str, list[int]] = {}
        self._exact: dict[str, int] = {}
        for raw_path in cfg.benchmarks:
            path = Path(raw_path)
            if not path.is_file():
                raise ConfigError(f"benchmark file {raw_path!r} does not exist: give a path to a JSONL, JSON, CSV or "
                                  "Parquet file.", field="decontaminate.benchmarks", value=raw_path)
            for i, record in enumerate(_records(path)):
                text = self._text(record, f"{path.name}[{i}]")
                self.add(f"{path.name}:{i + 1}" if path.suffix.lower() == ".jsonl" else f"{path.name}[{i}]", text)

    def _text(self, record: Any, locator: str) -> str:
        if isinstance(record, str):
            return record
        if not isinstance(record, dict):
            raise ConfigError(f"benchmark record {locator} is a {type(record).__name__}, not an object.",
                              field="decontaminate.benchmarks")
        names = [self.cfg.field] if self.cfg.field else [f for f in _QUESTION_FIELDS if f in record]
        if not names or not isinstance(record.get(names[0]), str):
            raise ConfigError(f"benchmark record {locator} has no text field ({self.cfg.field or _QUESTION_FIELDS}); "
                              "set `decontaminate.field`.", field="decontaminate.field", value=self.cfg.field)
        return record[names[0]]

    def add(self, locator: str, text: str) -> None:
        norm = normalize(text)
        idx = len(self.items)
        grams = _grams(norm.split(), self.cfg.n)
        self.items.append((locator, len(grams)))
        self._exact.setdefault(_digest(norm), idx)
        for g in grams:
            self._by_gram.setdefault(g, []).append(idx)

    def best_match(self, text: str) -> tuple[str, float] | None:
        """The benchmark record sharing the largest share of ``text``'s n-grams, and that share."""
        norm = normalize(text)
        exact = self._exact.get(_digest(norm))
        if exact is not None:
            return self.items[exact][0], 1.0
        grams = _grams(norm.split(), self.cfg.n)
        if not grams:
            return None
        hits: Counter[int] = Counter()
        for g in grams:
            for idx in set(self._by_gram.get(g, ())):
                hits[idx] += 1
        if not hits:
            return None
        idx, count = min(hits.items(), key=lambda kv: (-kv[1], kv[0]))
        return self.items[idx][0], count / len(grams)


def decontaminate(items: Iterable[tuple[str, str]], index: BenchmarkIndex) -> tuple[list[str], list[Dropped]]:
    """``(id, text)`` items → (ids kept, in order; contaminated records with their benchmark match)."""
    kept: list[str] = []
    dropped: list[Dropped] = []
    for item_id, text in items:
        match = index.best_match(text)
        if match is not None and match[1] >= index.cfg.threshold:
            dropped.append(Dropped(item_id, "contaminated", match[0], match[1]))
        else:
            kept.append(item_id)
    return kept, dropped
