"""rStar-Math process preference model (PPM) export: ``prompt, pos, neg, pos_count, neg_count``.

One row per prefix node: ``prompt`` is the build's prompt for the shared prefix, ``pos``/``neg`` the
preferred and dispreferred next steps from the pairs made there (rStar-Math keeps up to 2 of each, the
Q-value extremes), with their counts. Pairs of every kind share prefixes, so they are merged per prefix.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import ExportBatch, ExportResult, ExportStream, ReleaseData, problem_of
from storage.exports.ppm_columns import ppm_columns
from storage.exports.stream import ProblemLookup, problem_batches, stream_export

NAME = "rstar-ppm"
SCHEMA = pa.schema([("prompt", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())),
                    ("pos_count", pa.int32()), ("neg_count", pa.int32())])


class RStarPPMOptions(BaseModel):
    """Options of the ``rstar-ppm`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_per_side: int = Field(2, ge=1, description="Most positive and negative steps kept per prefix (rStar-Math: 2 × 2).")
    kinds: list[str] | None = Field(None, description="Pair kinds to use; all when unset.")


def export(data: ReleaseData, options: RStarPPMOptions) -> ExportResult:
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: RStarPPMOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA, _batches(data, options, presort), NAME)


_COLUMNS = ["prefix_steps", "chosen", "rejected", "chosen_value", "rejected_value", "kind"]
Groups = dict[tuple[str, tuple[str, ...]], dict[str, dict[str, float]]]


def _batches(data: ReleaseData, options: RStarPPMOptions, presort: bool):  # -> ExportStream.batches
    # Pairs of every kind and shard file merge per prefix, and the rows come out sorted by (problem, prefix): the
    # pairs are read merged by problem across their files, so each chunk holds whole problems, in order, and
    # only one chunk's groups are held at a time.
    lookup = ProblemLookup(data.table("problems"))
    n = 0
    empty = True
    for t in problem_batches(data, "pairs", _COLUMNS, presort=presort):
        arrays = ppm_columns(t, options.kinds, options.max_per_side, data.renderer, lookup)
        if arrays is None:  # what the columns do not reproduce exactly: the records, prefix by prefix
            batch = pa.RecordBatch.from_pylist(_records(t, data, options, lookup), schema=SCHEMA)
        else:
            batch = pa.RecordBatch.from_arrays([arrays[f.name] for f in SCHEMA], schema=SCHEMA) if len(arrays["prompt"]) else None
        if batch is not None and batch.num_rows:
            n += batch.num_rows
            empty = False
            yield ExportBatch(batch)
    if empty:
        yield ExportBatch(pa.RecordBatch.from_pylist([], schema=SCHEMA))
    return {"rows": n}, []


def _records(t: pa.Table, data: ReleaseData, options: RStarPPMOptions, lookup: ProblemLookup) -> list[dict]:
    """The rows of the pairs ``t`` (whole problems), one dict per prefix; ``ppm_columns`` makes the same."""
    r = data.renderer
    ordered = sorted(_groups(t, options.kinds).items())
    problems = lookup.dicts([pid for (pid, _), _ in ordered])
    out = []
    for (pid, prefix), g in ordered:
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
    return out


def _groups(t: pa.Table, kinds: list[str] | None) -> Groups:
    """(problem, prefix) → {"pos": chosen step → its best value, "neg": rejected step → its worst} over the pairs
    of ``t`` (missing values: chosen 1.0, rejected 0.0)."""
    groups: Groups = {}
    cols = t.select(["problem_id", *_COLUMNS]).to_pydict()
    for pid, prefix, chosen, rejected, cv, rv, kind in zip(*cols.values()):
        if kinds is not None and kind not in kinds:
            continue
        g = groups.setdefault((pid, tuple(prefix or [])), {"pos": {}, "neg": {}})
        cv = cv if cv is not None else 1.0
        rv = rv if rv is not None else 0.0
        g["pos"][chosen] = max(cv, g["pos"].get(chosen, cv))
        g["neg"][rejected] = min(rv, g["neg"].get(rejected, rv))
    return groups
