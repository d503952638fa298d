"""Problem-level dedup and decontamination before search (storage/dedup.py does the matching): which
problems of a source are searched, and every dropped one with its reason and match, for the manifest."""

from __future__ import annotations

from typing import Any, Sequence

from storage.dedup import BenchmarkIndex, DecontamConfig, DedupConfig, decontaminate, dedup
from tasks.problem import Problem

MAX_LISTED = 1000  # dropped records listed in the manifest (all are counted)


def filter_problems(problems: Sequence[Problem], dedup_cfg: DedupConfig,
                    decontam_cfg: DecontamConfig) -> tuple[list[Problem], list[dict[str, Any]]]:
    """(problems to search, in order; dropped problems as manifest rows). Decontamination runs first, so a
    benchmark problem and its copies are all reported as contaminated, never as duplicates of each other."""
    by_id = {p.problem_id: p for p in problems}
    items = [(p.problem_id, p.question) for p in problems]
    dropped = []
    if decontam_cfg.benchmarks:
        keep_ids, out = decontaminate(items, BenchmarkIndex(decontam_cfg))
        dropped += out
        keep = set(keep_ids)
        items = [it for it in items if it[0] in keep]
    if dedup_cfg.enabled:
        keep_ids, out = dedup(items, dedup_cfg)
        dropped += out
        keep = set(keep_ids)
        items = [it for it in items if it[0] in keep]
    # The source's own record id where it has one, so a dropped problem can be found in the source file.
    rows = [{**d.as_dict(), "question": by_id[d.id].question[:200], "source": by_id[d.id].source,
             **({"source_id": by_id[d.id].metadata["source_id"]} if "source_id" in by_id[d.id].metadata else {})}
            for d in dropped]
    return [by_id[i] for i, _ in items], rows


def manifest_entry(dropped: list[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest records: counts by reason and the first MAX_LISTED dropped problems."""
    counts: dict[str, int] = {}
    for row in dropped:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    return {"dropped": len(dropped), "by_reason": dict(sorted(counts.items())), "records": dropped[:MAX_LISTED]}
