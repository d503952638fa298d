"""TRL preference export (``prompt``, ``chosen``, ``rejected``), standard or conversational.

Standard: ``prompt`` is the build's full prompt for the pair's prefix node (problem template + the shared
prefix steps, rendered from the manifest's Jinja), so ``prompt + chosen`` is exactly the text the policy
would continue; ``chosen``/``rejected`` are the next step written in the step format (or, with
``continuation="full"``, the rest of the solution from there).

Conversational: TRL requires ``chosen``/``rejected`` to be assistant turns, so the prompt holds the
system/user messages and the shared prefix opens both assistant replies (``prefix + step``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import ExportResult, ExportStream, ReleaseData, problem_of
from storage.exports.pair_columns import PairColumns
from storage.exports.pair_stream import pair_record_batches
from storage.exports.stream import stream_export

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


def export(data: ReleaseData, options: TRLDPOOptions) -> ExportResult:
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: TRLDPOOptions, presort: bool = False) -> ExportStream:
    schema = SCHEMA_STANDARD if options.style == "standard" else SCHEMA_CONVERSATIONAL
    return ExportStream(schema, _batches(data, options, schema, presort), NAME)


def _batches(data: ReleaseData, options: TRLDPOOptions, schema: pa.Schema, presort: bool):  # -> ExportStream.batches
    return (yield from pair_record_batches(data, options.kinds, options.min_margin, options.consensus, schema,
                                           lambda rows, problems: _records(data, options, rows, problems), presort,
                                           lambda cols: _columns(data, options, cols)))


def _columns(data: ReleaseData, options: TRLDPOOptions, cols: PairColumns) -> dict[str, pa.Array] | None:
    """``_records`` column-wise; None where a standard prompt is not the problem's head followed by the prefix
    (``PromptLayout.prompt_head``)."""
    chosen, rejected = cols.next_step("chosen"), cols.next_step("rejected")
    if options.continuation == "full":
        chosen, rejected = cols.stored_or("full_chosen", chosen), cols.stored_or("full_rejected", rejected)
    if options.style == "conversational":
        # The problem's messages once per problem; each side one assistant turn, the prefix opening it.
        messages = cols.per_problem(data.renderer.messages, ["question"], _MESSAGES)
        opened = cols.prefix_text()
        return {"prompt": messages, "chosen": _assistant(pc.binary_join_element_wise(opened, chosen, "")),
                "rejected": _assistant(pc.binary_join_element_wise(opened, rejected, ""))}
    heads = cols.prompt_heads(data.renderer.prompt_head)
    if heads.null_count:
        return None
    return {"prompt": pc.binary_join_element_wise(heads, cols.prefix_text(), ""), "chosen": chosen, "rejected": rejected}


def _assistant(content: pa.Array) -> pa.Array:
    """``[{"role": "assistant", "content": c}]`` for each ``c``, as a list-of-messages column."""
    turns = pa.StructArray.from_arrays([pa.array(["assistant"] * len(content), pa.string()), content],
                                       fields=list(_MESSAGES.value_type))
    return pa.ListArray.from_arrays(pa.array(np.arange(len(content) + 1, dtype=np.int32)), turns, type=_MESSAGES)


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
