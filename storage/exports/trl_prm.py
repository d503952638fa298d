"""TRL stepwise supervision (PRM) export: ``prompt``, ``completions`` (list<string>), ``labels``.

Hard labels (list<bool>) come from the stored Monte Carlo evidence by ``step_labels``: by default a step is
good iff it comes before the solution's ``first_error_index`` (a rollout from it, or from a longer prefix
below it, reached the answer); ``per-step`` labels each step by its own ``mc_value > threshold`` (at
threshold 0 Math-Shepherd's hard estimate). Soft labels (list<float>, c/k) are available for regression
PRMs, with a warning: TRL's PRM trainer casts each label with ``int()``. ``consensus`` keeps only the
solutions on which MC agrees with the judge / step checks (``storage.consensus``).
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import UNESTIMATED_DESCRIPTION, ExportResult, ReleaseData, Unestimated, check_columns, solutions, warn_soft_labels
from storage.exports.labels import (LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, adaptive_warning, apply_consensus,
                                    resolve_step_labels, solution_labels)

NAME = "trl-prm"
SCHEMA_HARD = pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.bool_()))])
SCHEMA_SOFT = pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.float64()))])


class TRLPRMOptions(BaseModel):
    """Options of the ``trl-prm`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: Literal["hard", "soft"] = Field("hard", description="`hard`: bool labels from the MC evidence (see `step_labels`); `soft`: c/k floats (TRL casts with int()).")
    threshold: float = Field(0.0, ge=0.0, lt=1.0, description="With `step_labels=per-step`: hard label = mc_value > threshold; 0 is Math-Shepherd's `c > 0`.")
    step_labels: StepLabels | None = Field(None, description=STEP_LABELS_DESCRIPTION)
    unestimated: Unestimated = Field("infer", description=UNESTIMATED_DESCRIPTION)
    consensus: Rule = Field("none", description=CONSENSUS_DESCRIPTION)

    @model_validator(mode="after")
    def _threshold_fits_rule(self) -> "TRLPRMOptions":
        if self.step_labels == "first-error" and self.threshold != 0.0:
            raise ValueError("`step_labels=first-error` labels by 'any rollout reached the answer' and takes no "
                             f"threshold, got threshold={self.threshold}: drop the threshold or use step_labels=per-step")
        return self
    prompt: Literal["question", "template"] = Field(
        "question", description="`question`: the raw problem text (TRL's stepwise examples); `template`: the build's prompt template with no steps.")


def export(data: ReleaseData, options: TRLPRMOptions) -> ExportResult:
    steps = data.table("steps")
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    soft = options.labels == "soft"
    # Soft labels are the raw c/k; MC's opinion for the consensus filter is still the hard rule's first error.
    rule = resolve_step_labels(options.step_labels, 0.0 if soft else options.threshold, NAME)
    hard = solution_labels(per, rule, 0.0 if soft else options.threshold, options.unestimated)
    final, decisions, report = apply_consensus(steps, per, hard, options.consensus)
    cols = per.select(["problem_id", "solution_id", "step_text_list", "mc_value_list", "mc_k_list"]).to_pydict()
    prompts, completions, labels = [], [], []
    without_mc = inferred = relabelled_soft = 0
    for pid, sid, texts, values, ks, lab, hard_lab in zip(*cols.values(), final, hard):
        if hard_lab is None:
            without_mc += 1  # no complete label sequence: dropped, never given an invented label
            continue
        if lab is None:
            continue  # dropped by the consensus rule (counted in its report)
        if soft:
            if any(v is None for v in values):
                without_mc += 1
                continue
            if lab != hard_lab:
                relabelled_soft += 1  # the majority outvoted MC: its c/k would contradict the kept first error
                continue
            labels.append([float(v) for v in values])
        else:
            labels.append(lab)
        inferred += not all(ks)
        prompts.append(data.problem(pid, record=f"steps[solution_id={sid}]")["question"])
        completions.append(texts)
    if options.prompt == "template":
        prompts = [data.renderer.user_message(q) for q in prompts]
    schema = SCHEMA_SOFT if soft else SCHEMA_HARD
    table = pa.Table.from_arrays([pa.array(prompts, pa.string()), pa.array(completions, pa.list_(pa.string())),
                                  pa.array(labels, schema.field("labels").type)], schema=schema)
    n_steps = sum(len(lab) for lab in labels)
    stats = {"rows": table.num_rows, "steps": n_steps, "step_labels": rule, "dropped_solutions_without_mc": without_mc,
             "solutions_with_inferred_steps": inferred, "consensus": report.as_dict()}
    if relabelled_soft:
        stats["consensus"]["dropped_soft_relabelled"] = relabelled_soft
    if not soft and n_steps:
        stats["positive_fraction"] = round(sum(sum(lab) for lab in labels) / n_steps, 6)
    warned = [warn_soft_labels()] if soft else []
    if soft and (biased := adaptive_warning(data)):
        warned.append(biased)
    return check_columns(ExportResult(table, stats=stats, warnings=warned), schema, NAME)
