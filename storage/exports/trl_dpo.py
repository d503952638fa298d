"""TRL preference export (``prompt``, ``chosen``, ``rejected``), standard or conversational.

Standard: ``prompt`` is the build's full prompt for the pair's prefix node (problem template + the shared
prefix steps, rendered from the manifest's Jinja), so ``prompt + chosen`` is exactly the text the policy
would continue; ``chosen``/``rejected`` are the next step written in the step format (or, with
``continuation="full"``, the rest of the solution from there).

Conversational: TRL requires ``chosen``/``rejected`` to be assistant turns, so the prompt holds the
system/user messages and the shared prefix opens both assistant replies (``prefix + step``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from storage.consensus import CONSENSUS_DESCRIPTION, ConsensusReport, Rule
from storage.exports.base import ExportBatch, ExportResult, ExportStream, ReleaseData, problem_of
from storage.exports.labels import filter_pairs
from storage.exports.stream import ProblemLookup, table_batches

NAME = "trl-dpo"
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA_STANDARD = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
SCHEMA_CONVERSATIONAL = pa.schema([("prompt", _MESSAGES), ("chosen", _MESSAGES), ("rejected", _MESSAGES)])


class TRLDPOOptions(BaseModel):
    """Options of the ``trl-dpo`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["standard", "conversational"] = Field("standard", description="TRL's standard (text) or conversational (messages) preference format.")
    continuation: Literal["step", "full"] = Field("step", description="`step`: chosen/rejected are the one differing step; `full`: the rest of each solution.")
    kinds: list[Literal["first_error", "sibling", "ranked", "formal"]] | None = Field(None, description="Pair kinds to keep; all when unset.")
    min_margin: float | None = Field(None, description="Keep pairs with margin ≥ this (pairs without a margin are dropped when set).")
    consensus: Rule = Field("none", description=CONSENSUS_DESCRIPTION + " For pairs: a pair is kept when its "
                            "rejected step is the agreed first error of a kept solution and no kept solution "
                            "calls its chosen step bad.")


def select_pairs(data: ReleaseData, kinds: list[str] | None, min_margin: float | None,
                 consensus: str = "none") -> tuple[list[dict], dict]:
    """The pairs to export and the consensus report (what the rule kept and dropped)."""
    rows = data.table("pairs").to_pylist()
    if kinds is not None:
        rows = [r for r in rows if r["kind"] in kinds]
    if min_margin is not None:
        rows = [r for r in rows if r["margin"] is not None and r["margin"] >= min_margin]
    return filter_pairs(data, rows, consensus)


def pair_batches(data: ReleaseData, kinds: list[str] | None, min_margin: float | None,
                 consensus: str = "none") -> tuple[Iterator[list[dict]], Any]:
    """``select_pairs`` as batches of rows, read batch by batch from the release's files (a pair as a dict only
    while its batch is built; the problems table stays Arrow, see ``ProblemLookup.dicts``), and a function
    giving the consensus report once they are consumed. With a consensus rule the pairs are selected whole:
    the rule needs every solution's decision, i.e. the whole steps table (``labels.filter_pairs``)."""
    if consensus != "none":
        rows, report = select_pairs(data, kinds, min_margin, consensus)
        return iter([rows]), lambda: report
    count = [0]

    def batches() -> Iterator[list[dict]]:
        for t in table_batches(data, "pairs"):
            if kinds is not None:
                t = t.filter(pc.is_in(t.column("kind"), value_set=pa.array(kinds, pa.string())))
            if min_margin is not None:
                t = t.filter(pc.fill_null(pc.greater_equal(t.column("margin"), min_margin), False))
            count[0] += t.num_rows
            yield t.to_pylist()

    def report() -> dict:
        r = ConsensusReport("none", unit="pairs")
        r.solutions = r.kept = count[0]
        return r.as_dict()

    return batches(), report


def export(data: ReleaseData, options: TRLDPOOptions) -> ExportResult:
    return stream(data, options).collect()


def stream(data: ReleaseData, options: TRLDPOOptions, presort: bool = False) -> ExportStream:
    schema = SCHEMA_STANDARD if options.style == "standard" else SCHEMA_CONVERSATIONAL
    return ExportStream(schema, _batches(data, options, schema), NAME)


def _batches(data: ReleaseData, options: TRLDPOOptions, schema: pa.Schema):  # -> ExportStream.batches
    return (yield from pair_record_batches(data, options.kinds, options.min_margin, options.consensus, schema,
                                           lambda rows, problems: _records(data, options, rows, problems)))


def pair_record_batches(data: ReleaseData, kinds: list[str] | None, min_margin: float | None, consensus: str,
                        schema: pa.Schema, records: Callable[[list[dict], dict[str, dict]], list[dict]]):
    """A pair export's ``ExportStream.batches``: ``records(pairs, their problems)`` for each batch of
    ``pair_batches``, as Arrow batches of ``schema``; the row count and the consensus report at the end."""
    batches, report = pair_batches(data, kinds, min_margin, consensus)
    lookup = ProblemLookup(data.table("problems"))
    n = 0
    for rows in batches:
        out = records(rows, lookup.dicts([r["problem_id"] for r in rows]))
        n += len(out)
        yield ExportBatch(pa.RecordBatch.from_pylist(out, schema=schema))
    return {"rows": n, "consensus": report()}, []


def _records(data: ReleaseData, options: TRLDPOOptions, rows: list[dict], problems: dict[str, dict]) -> list[dict]:
    r = data.renderer
    out: list[dict] = []
    for row in rows:
        record = f"pairs[pair_id={row['pair_id']}]"
        question = problem_of(problems, row["problem_id"], record)["question"]
        prefix = list(row["prefix_steps"] or [])
        start = len(prefix)
        if options.continuation == "full":
            chosen, rejected = row["full_chosen"] or r.step(start, row["chosen"]), row["full_rejected"] or r.step(start, row["rejected"])
        else:
            chosen, rejected = r.step(start, row["chosen"]), r.step(start, row["rejected"])
        if options.style == "standard":
            out.append({"prompt": r.prompt(question, prefix), "chosen": chosen, "rejected": rejected})
        else:
            opened = r.steps(prefix)
            out.append({"prompt": r.messages(question),
                        "chosen": [{"role": "assistant", "content": opened + chosen}],
                        "rejected": [{"role": "assistant", "content": opened + rejected}]})
    return out
