"""PRM800K-style export: one JSONL record per solution, steps rated −1/0/1 (OpenAI's prm800k layout:
``question.problem``, ``question.ground_truth_answer``, ``label.steps[].completions[].rating``,
``label.finish_reason``), plus the same records as Parquet so ``datasets`` loads them.

Ratings come from the MC estimate: ``mc_value == 0`` → −1 (no rollout recovers), ``mc_value ≥
positive_min`` → +1, anything between → ``neutral`` (0 by default; PRM800K's own "ok but not progress"
rating). The neutral mapping is an explicit option because trainers disagree on it.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import (UNESTIMATED_DESCRIPTION, ExportResult, ReleaseData, Unestimated, check_columns,
                                  gc_paused, implied_hard_labels, solutions)

NAME = "prm800k"
_COMPLETION = pa.struct([("text", pa.string()), ("rating", pa.int8()), ("flagged", pa.bool_())])
_STEP = pa.struct([("completions", pa.list_(_COMPLETION)), ("human_completion", pa.string()), ("chosen_completion", pa.int32())])
SCHEMA = pa.schema([
    ("labeler", pa.string()),
    ("is_quality_control_question", pa.bool_()),
    ("is_initial_screening_question", pa.bool_()),
    ("question", pa.struct([("problem", pa.string()), ("ground_truth_answer", pa.string())])),
    ("label", pa.struct([("steps", pa.list_(_STEP)), ("finish_reason", pa.string())])),
    ("solution_id", pa.string()),
])


class PRM800KOptions(BaseModel):
    """Options of the ``prm800k`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positive_min: float = Field(1.0, gt=0.0, le=1.0, description="mc_value ≥ this rates +1 (1.0: every rollout correct).")
    neutral: Literal[-1, 0, 1] = Field(0, description="Rating of steps with 0 < mc_value < positive_min.")
    stop_at_first_error: bool = Field(True, description="End each solution at its first −1 step (finish_reason `found_error`), as PRM800K labellers did.")
    unestimated: Unestimated = Field(
        "infer", description=UNESTIMATED_DESCRIPTION + " Here an implied-bad step rates −1 and an implied-good "
        "one `neutral` (some continuation reached the answer, but there is no MC value to rate it +1).")


def rating(mc_value: float, options: PRM800KOptions) -> int:
    if mc_value <= 0.0:
        return -1
    if mc_value >= options.positive_min:
        return 1
    return options.neutral


def export(data: ReleaseData, options: PRM800KOptions) -> ExportResult:
    steps_table = data.table("steps")
    # The evidence columns are gathered only when some step lacks an MC value (OmegaPRM), which keeps the
    # common all-estimated export as fast as before.
    evidence = ["mc_k", "mc_c", "first_error_index"] if steps_table["mc_value"].null_count else []
    per = solutions(steps_table, ["step_text", "mc_value", *evidence])
    out, dropped = [], 0
    counts = {-1: 0, 0: 0, 1: 0}
    cols = per.select(["problem_id", "solution_id", "step_text_list", "mc_value_list",
                       *(f"{c}_list" for c in evidence)]).to_pydict()
    none_lists = [None] * per.num_rows
    ks_all, cs_all, fes_all = ([cols.pop(f"{c}_list") for c in evidence] if evidence else
                               (none_lists, none_lists, none_lists))
    with gc_paused():
        for (pid, sid, texts, values), ks, cs, fes in zip(zip(*cols.values()), ks_all, cs_all, fes_all):
            implied: list[bool] | None = None
            if any(v is None for v in values):
                implied = (implied_hard_labels(ks, cs, fes[0] if fes else None)
                           if options.unestimated == "infer" else None)
                if implied is None:
                    dropped += 1
                    continue
            problem = data.problem(pid, record=f"steps[solution_id={sid}]")
            steps, finish = [], "solution"
            if implied is None:
                ratings = [rating(value, options) for value in values]
            else:  # steps without rollouts of their own: what the evidence around them implies
                ratings = [rating(v, options) if v is not None else options.neutral if good else -1
                           for v, good in zip(values, implied)]
            for text, r in zip(texts, ratings):
                counts[r] += 1
                steps.append({"completions": [{"text": text, "rating": r, "flagged": False}],
                              "human_completion": None, "chosen_completion": 0})
                if r == -1 and options.stop_at_first_error:
                    finish = "found_error"
                    break
            out.append({"labeler": "stepforge-mc", "is_quality_control_question": False, "is_initial_screening_question": False,
                        "question": {"problem": problem["question"], "ground_truth_answer": problem.get("answer")},
                        "label": {"steps": steps, "finish_reason": finish}, "solution_id": sid})
        table = pa.Table.from_pylist(out, schema=SCHEMA)
    stats = {"rows": table.num_rows, "ratings": {str(k): v for k, v in counts.items()}, "dropped_solutions_without_mc": dropped}
    return check_columns(ExportResult(table, jsonl=out, stats=stats), SCHEMA, NAME)
