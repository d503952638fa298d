"""PRM800K-style export: one JSONL record per solution, steps rated −1/0/1 (OpenAI's prm800k layout:
``question.problem``, ``question.ground_truth_answer``, ``label.steps[].completions[].rating``,
``label.finish_reason``), plus the same records as Parquet so ``datasets`` loads them.

Ratings come from the MC evidence: a bad step (by ``step_labels``: by default at or after the solution's
``first_error_index``; ``per-step``: its own ``mc_value == 0``) → −1, a good one with ``mc_value ≥
positive_min`` → +1, any other good one → ``neutral`` (0 by default; PRM800K's own "ok but not progress"
rating; a good step whose own rollouts all failed is good because a rollout below it reached the answer).
The neutral mapping is an explicit option because trainers disagree on it. ``consensus`` keeps only the
solutions on which MC agrees with the judge / step checks (``storage.consensus``).
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import UNESTIMATED_DESCRIPTION, ExportResult, ReleaseData, Unestimated, check_columns, gc_paused, solutions
from storage.exports.labels import (LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, adaptive_warning, apply_consensus,
                                    resolve_step_labels, solution_labels)

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
    step_labels: StepLabels | None = Field(None, description=STEP_LABELS_DESCRIPTION + " (No threshold here: "
                                           "unset means `first-error`.)")
    unestimated: Unestimated = Field(
        "infer", description=UNESTIMATED_DESCRIPTION + " Here an implied-bad step rates −1 and an implied-good "
        "one `neutral` (some continuation reached the answer, but there is no MC value to rate it +1).")
    consensus: Rule = Field("none", description=CONSENSUS_DESCRIPTION)


def rating(mc_value: float, options: PRM800KOptions) -> int:
    if mc_value <= 0.0:
        return -1
    if mc_value >= options.positive_min:
        return 1
    return options.neutral


def export(data: ReleaseData, options: PRM800KOptions) -> ExportResult:
    steps_table = data.table("steps")
    per = solutions(steps_table, ["step_text", *LABEL_COLUMNS])
    rule = resolve_step_labels(options.step_labels, 0.0, NAME)
    hard = solution_labels(per, rule, 0.0, options.unestimated)
    final, _, report = apply_consensus(steps_table, per, hard, options.consensus)
    out, dropped = [], 0
    counts = {-1: 0, 0: 0, 1: 0}
    cols = per.select(["problem_id", "solution_id", "step_text_list", "mc_value_list"]).to_pydict()
    with gc_paused():
        for (pid, sid, texts, values), labels, hard_lab in zip(zip(*cols.values()), final, hard):
            if hard_lab is None:
                dropped += 1
                continue
            if labels is None:
                continue  # dropped by the consensus rule (counted in its report)
            problem = data.problem(pid, record=f"steps[solution_id={sid}]")
            steps, finish = [], "solution"
            # A good step without a positive MC value of its own (no rollouts, or all of its own failed while
            # one below it succeeded) has nothing to rate +1 on: neutral.
            ratings = [(rating(v, options) if v else options.neutral) if good else -1
                       for v, good in zip(values, labels)]
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
    stats = {"rows": table.num_rows, "step_labels": rule, "ratings": {str(k): v for k, v in counts.items()},
             "dropped_solutions_without_mc": dropped, "consensus": report.as_dict()}
    biased = adaptive_warning(data)
    return check_columns(ExportResult(table, jsonl=out, stats=stats, warnings=[biased] if biased else []), SCHEMA, NAME)
