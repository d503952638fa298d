"""Math-Shepherd export (peiyi9979/Math-Shepherd columns): ``input, label, task``.

``input`` is the question followed by the steps, each step ending with the step tag ``ки``; ``label`` is
the same text with each tag replaced by ``+`` or ``-`` (hard labels by ``step_labels``: by default good iff
before the solution's ``first_error_index``; ``per-step`` is ``mc_value > threshold``, the paper's "any
rollout correct" at threshold 0). ``task`` names the source (GSM8K, MATH, …). ``consensus`` keeps only the
solutions on which MC agrees with the judge / step checks (``storage.consensus``).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import UNESTIMATED_DESCRIPTION, ExportResult, ReleaseData, Unestimated, check_columns, solutions
from storage.exports.labels import (LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, apply_consensus, resolve_step_labels,
                                    solution_labels)

NAME = "math-shepherd"
STEP_TAG = "ки"
SCHEMA = pa.schema([("input", pa.string()), ("label", pa.string()), ("task", pa.string())])


class MathShepherdOptions(BaseModel):
    """Options of the ``math-shepherd`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.0, ge=0.0, lt=1.0, description="With `step_labels=per-step`: `+` when mc_value > threshold (0: any rollout correct).")
    step_labels: StepLabels | None = Field(None, description=STEP_LABELS_DESCRIPTION)
    unestimated: Unestimated = Field("infer", description=UNESTIMATED_DESCRIPTION)
    consensus: Rule = Field("none", description=CONSENSUS_DESCRIPTION)

    @model_validator(mode="after")
    def _threshold_fits_rule(self) -> "MathShepherdOptions":
        if self.step_labels == "first-error" and self.threshold != 0.0:
            raise ValueError("`step_labels=first-error` labels by 'any rollout reached the answer' and takes no "
                             f"threshold, got threshold={self.threshold}: drop the threshold or use step_labels=per-step")
        return self
    task: str | None = Field(None, description="Value of the `task` column; default each problem's `source`.")
    step_label: str = Field("Step {i}: ", description="Written before step i (1-based), as in Math-Shepherd; "
                            "may not contain the step tag `ки`.")

    @field_validator("step_label")
    @classmethod
    def _no_tag_in_label(cls, value: str) -> str:
        # Every occurrence of the tag in `input` is read as one step's slot; one in the label would add a slot
        # per step and shift every label after it.
        if STEP_TAG in value:
            raise ValueError(f"must not contain the step tag {STEP_TAG!r}")
        return value


def export(data: ReleaseData, options: MathShepherdOptions) -> ExportResult:
    steps = data.table("steps")
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    out, dropped, quarantined = [], 0, []
    rule = resolve_step_labels(options.step_labels, options.threshold, NAME)
    hard = solution_labels(per, rule, options.threshold, options.unestimated)
    final, _, report = apply_consensus(steps, per, hard, options.consensus)
    for pid, sid, texts, labels, hard_lab in zip(per["problem_id"].to_pylist(), per["solution_id"].to_pylist(),
                                                 per["step_text_list"].to_pylist(), final, hard):
        if hard_lab is None:
            dropped += 1
            continue
        if labels is None:
            continue  # dropped by the consensus rule (counted in its report)
        problem = data.problem(pid, record=f"steps[solution_id={sid}]")
        # A tag inside the question or a step would be read as an extra step slot and shift every later
        # label, so such a solution is left out (counted, with a warning) rather than emitted misaligned;
        # one odd record does not stop the export.
        if STEP_TAG in problem["question"]:
            quarantined.append(f"problems[problem_id={pid}]: question")
            continue
        bad = next((i for i, t in enumerate(texts) if STEP_TAG in t), None)
        if bad is not None:
            quarantined.append(f"steps[solution_id={sid}, step_index={bad}]: step_text")
            continue
        body = [f"{options.step_label.format(i=i + 1)}{t}" for i, t in enumerate(texts)]
        marks = ["+" if good else "-" for good in labels]
        inp = problem["question"] + " " + "\n".join(f"{b} {STEP_TAG}" for b in body)
        label = problem["question"] + " " + "\n".join(f"{b} {m}" for b, m in zip(body, marks))
        out.append({"input": inp, "label": label, "task": options.task or problem.get("source") or data.dataset})
    table = pa.Table.from_pylist(out, schema=SCHEMA)
    warned = []
    if quarantined:
        warned.append(f"{len(quarantined)} solution(s) left out because their text contains the step tag {STEP_TAG!r}, "
                      f"which would misalign the labels (first: {quarantined[0]}).")
    stats = {"rows": table.num_rows, "step_labels": rule, "dropped_solutions_without_mc": dropped,
             "quarantined_step_tag": len(quarantined), "quarantine": quarantined[:100], "consensus": report.as_dict()}
    return check_columns(ExportResult(table, stats=stats, warnings=warned), SCHEMA, NAME)
