"""rStar-Math process preference model (PPM) export: ``prompt, pos, neg, pos_count, neg_count``.

One row per prefix node: ``prompt`` is the build's prompt for the shared prefix, ``pos``/``neg`` the
preferred and dispreferred next steps from the pairs made there (rStar-Math keeps up to 2 of each, the
Q-value extremes), with their counts. Pairs of every kind share prefixes, so they are merged per prefix.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import ExportResult, ReleaseData, check_columns

NAME = "rstar-ppm"
SCHEMA = pa.schema([("prompt", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())),
                    ("pos_count", pa.int32()), ("neg_count", pa.int32())])


class RStarPPMOptions(BaseModel):
    """Options of the ``rstar-ppm`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_per_side: int = Field(2, ge=1, description="Most positive and negative steps kept per prefix (rStar-Math: 2 × 2).")
    kinds: list[str] | None = Field(None, description="Pair kinds to use; all when unset.")


def export(data: ReleaseData, options: RStarPPMOptions) -> ExportResult:
    groups: dict[tuple[str, tuple[str, ...]], dict[str, dict[str, float]]] = {}
    for row in data.table("pairs").to_pylist():
        if options.kinds is not None and row["kind"] not in options.kinds:
            continue
        key = (row["problem_id"], tuple(row["prefix_steps"] or []))
        g = groups.setdefault(key, {"pos": {}, "neg": {}})
        cv = row["chosen_value"] if row["chosen_value"] is not None else 1.0
        rv = row["rejected_value"] if row["rejected_value"] is not None else 0.0
        g["pos"][row["chosen"]] = max(cv, g["pos"].get(row["chosen"], cv))
        g["neg"][row["rejected"]] = min(rv, g["neg"].get(row["rejected"], rv))
    r = data.renderer
    out = []
    for (pid, prefix), g in sorted(groups.items()):
        # A step preferred in one pair and dispreferred in another is ambiguous at this prefix: drop it.
        both = set(g["pos"]) & set(g["neg"])
        pos = sorted((s for s in g["pos"] if s not in both), key=lambda s: (-g["pos"][s], s))[: options.max_per_side]
        neg = sorted((s for s in g["neg"] if s not in both), key=lambda s: (g["neg"][s], s))[: options.max_per_side]
        if not pos or not neg:
            continue
        question = data.problem(pid, record=f"pairs[problem_id={pid}]")["question"]
        start = len(prefix)
        out.append({"prompt": r.prompt(question, list(prefix)), "pos": [r.step(start, s) for s in pos],
                    "neg": [r.step(start, s) for s in neg], "pos_count": len(pos), "neg_count": len(neg)})
    table = pa.Table.from_pylist(out, schema=SCHEMA)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows}), SCHEMA, NAME)
