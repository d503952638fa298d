"""rStar-Math process preference model (PPM) export: ``prompt, pos, neg, pos_count, neg_count``.

One row per prefix node: ``prompt`` is the build's prompt for the shared prefix, ``pos``/``neg`` the
preferred and dispreferred next steps from the pairs made there (rStar-Math keeps up to 2 of each, the
Q-value extremes), with their counts. Pairs of every kind share prefixes, so they are merged per prefix.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import ExportBatch, ExportResult, ExportStream, ReleaseData, problem_of
from storage.exports import stream as stream_mod
from storage.exports.stream import ProblemLookup, table_batches

NAME = "rstar-ppm"
SCHEMA = pa.schema([("prompt", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())),
                    ("pos_count", pa.int32()), ("neg_count", pa.int32())])


class RStarPPMOptions(BaseModel):
    """Options of the ``rstar-ppm`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_per_side: int = Field(2, ge=1, description="Most positive and negative steps kept per prefix (rStar-Math: 2 × 2).")
    kinds: list[str] | None = Field(None, description="Pair kinds to use; all when unset.")


def export(data: ReleaseData, options: RStarPPMOptions) -> ExportResult:
    return stream(data, options).collect()


def stream(data: ReleaseData, options: RStarPPMOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA, _batches(data, options), NAME)


def _batches(data: ReleaseData, options: RStarPPMOptions):  # -> ExportStream.batches
    # Pairs of every kind and shard file merge per prefix, and the rows come out sorted by (problem, prefix),
    # so the groups are built whole; the pairs themselves are read in batches, and only their
    # (problem, prefix) → step → value entries are kept, not the pair rows.
    groups: dict[tuple[str, tuple[str, ...]], dict[str, dict[str, float]]] = {}
    for t in table_batches(data, "pairs"):
        cols = t.select(["problem_id", "prefix_steps", "chosen", "rejected", "chosen_value", "rejected_value",
                         "kind"]).to_pydict()
        for pid, prefix, chosen, rejected, cv, rv, kind in zip(*cols.values()):
            if options.kinds is not None and kind not in options.kinds:
                continue
            g = groups.setdefault((pid, tuple(prefix or [])), {"pos": {}, "neg": {}})
            cv = cv if cv is not None else 1.0
            rv = rv if rv is not None else 0.0
            g["pos"][chosen] = max(cv, g["pos"].get(chosen, cv))
            g["neg"][rejected] = min(rv, g["neg"].get(rejected, rv))
    r = data.renderer
    lookup = ProblemLookup(data.table("problems"))
    ordered = sorted(groups.items())
    n = 0
    size = stream_mod.RECORD_BATCH_ROWS
    for start in range(0, max(len(ordered), 1), size):
        chunk = ordered[start: start + size]
        problems = lookup.dicts([pid for (pid, _), _ in chunk])
        out = []
        for (pid, prefix), g in chunk:
            # A step preferred in one pair and dispreferred in another is ambiguous at this prefix: drop it.
            both = set(g["pos"]) & set(g["neg"])
            pos = sorted((s for s in g["pos"] if s not in both), key=lambda s: (-g["pos"][s], s))[: options.max_per_side]
            neg = sorted((s for s in g["neg"] if s not in both), key=lambda s: (g["neg"][s], s))[: options.max_per_side]
            if not pos or not neg:
                continue
            question = problem_of(problems, pid, f"pairs[problem_id={pid}]")["question"]
            first = len(prefix)
            out.append({"prompt": r.prompt(question, list(prefix)), "pos": [r.step(first, s) for s in pos],
                        "neg": [r.step(first, s) for s in neg], "pos_count": len(pos), "neg_count": len(neg)})
        n += len(out)
        yield ExportBatch(pa.RecordBatch.from_pylist(out, schema=SCHEMA))
    return {"rows": n}, []
