"""Exports of a MUSTARD-style release's `mustard` table (`stepforge mustard`): Lean-verified proofs for
supervised fine-tuning, and Lean-verified revision pairs for preference training.

- `lean-proofs`: `prompt, completion, concept, level, revisions`: the prompt asks for a Lean 4 + Mathlib
  proof of the problem (with its informal proof as a guide unless `with_informal=false`); the completion is
  the Lean file Lean accepted.
- `lean-revision-dpo`: `prompt, chosen, rejected` (TRL's standard or conversational preference format):
  one row per attempt Lean rejected, the chosen side the file Lean accepted for the same problem. Both
  sides were checked by Lean: the rejected one has Lean's error, the chosen one none.

A release without a `mustard` table (any build) exports no rows.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import ExportResult, ReleaseData, check_columns

PROOFS = "lean-proofs"
REVISION_DPO = "lean-revision-dpo"
PROOFS_SCHEMA = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("concept", pa.string()),
                           ("level", pa.string()), ("revisions", pa.int32())])
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
DPO_STANDARD = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
DPO_CONVERSATIONAL = pa.schema([("prompt", _MESSAGES), ("chosen", _MESSAGES), ("rejected", _MESSAGES)])


class LeanProofsOptions(BaseModel):
    """Options of the `lean-proofs` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    with_informal: bool = Field(True, description="Put the informal proof in the prompt (proof translation); "
                                "false: the problem alone (proving).")
    max_revisions: int | None = Field(None, ge=0, description="Keep records that took at most this many "
                                      "revisions; all when unset.")


class LeanRevisionDPOOptions(BaseModel):
    """Options of the `lean-revision-dpo` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["standard", "conversational"] = Field("standard", description="TRL's standard (text) or "
                                                         "conversational (messages) preference format.")
    with_informal: bool = Field(True, description="Put the informal proof in the prompt.")


def prompt_text(problem: str, informal: str | None) -> str:
    text = f"Prove the following in Lean 4 with Mathlib. Answer with the complete Lean file.\n\nProblem:\n{problem}\n"
    if informal:
        text += f"\nInformal proof:\n{informal}\n"
    return text + "\nFormal proof:\n"


def _records(data: ReleaseData) -> list[dict]:
    return sorted(data.table("mustard").to_pylist(), key=lambda r: r["seed_id"])


def export_proofs(data: ReleaseData, options: LeanProofsOptions) -> ExportResult:
    out = []
    for r in _records(data):
        if options.max_revisions is not None and r["revisions"] > options.max_revisions:
            continue
        out.append({"prompt": prompt_text(r["problem"], r["informal_proof"] if options.with_informal else None),
                    "completion": r["formal_proof"], "concept": r["concept"], "level": r["level"],
                    "revisions": r["revisions"]})
    table = pa.Table.from_pylist(out, schema=PROOFS_SCHEMA)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows}), PROOFS_SCHEMA, PROOFS)


def export_revision_dpo(data: ReleaseData, options: LeanRevisionDPOOptions) -> ExportResult:
    out = []
    for r in _records(data):
        prompt = prompt_text(r["problem"], r["informal_proof"] if options.with_informal else None)
        statuses = [v["status"] for v in r["verdicts"] or []]
        # Only attempts Lean judged and rejected: a timeout or an unparsed answer says nothing about the proof.
        for attempt, status in zip(r["attempts"][:-1], statuses[:-1]):
            if status != "invalid" or attempt == r["formal_proof"]:
                continue
            if options.style == "standard":
                out.append({"prompt": prompt, "chosen": r["formal_proof"], "rejected": attempt})
            else:
                out.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": r["formal_proof"]}],
                            "rejected": [{"role": "assistant", "content": attempt}]})
    schema = DPO_STANDARD if options.style == "standard" else DPO_CONVERSATIONAL
    table = pa.Table.from_pylist(out, schema=schema)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows}), schema, REVISION_DPO)
