"""TRL stepwise supervision (PRM) export: ``prompt``, ``completions`` (list<string>), ``labels``.

Hard labels (list<bool>) are ``mc_value > threshold``; the default threshold 0 is Math-Shepherd's hard
estimate (a step is good if any rollout from it reached the right answer). Soft labels (list<float>, c/k)
are available for regression PRMs, with a warning: TRL's PRM trainer casts each label with ``int()``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from storage.exports.base import (UNESTIMATED_DESCRIPTION, ExportResult, ReleaseData, Unestimated, check_columns,
                                  hard_labels, solution_hard_labels, solutions, warn_soft_labels)

NAME = "trl-prm"
SCHEMA_HARD = pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.bool_()))])
SCHEMA_SOFT = pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.float64()))])


class TRLPRMOptions(BaseModel):
    """Options of the ``trl-prm`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: Literal["hard", "soft"] = Field("hard", description="`hard`: bool labels from a threshold on c/k; `soft`: c/k floats (TRL casts with int()).")
    threshold: float = Field(0.0, ge=0.0, lt=1.0, description="Hard label = mc_value > threshold; 0 is Math-Shepherd's `c > 0`.")
    unestimated: Unestimated = Field("infer", description=UNESTIMATED_DESCRIPTION)
    prompt: Literal["question", "template"] = Field(
        "question", description="`question`: the raw problem text (TRL's stepwise examples); `template`: the build's prompt template with no steps.")


def export(data: ReleaseData, options: TRLPRMOptions) -> ExportResult:
    steps = data.table("steps")
    per_solution = solutions(steps, ["step_text", "mc_value", "mc_k", "mc_c", "first_error_index"])
    complete = pc.equal(per_solution["mc_value_count"], 0)
    inferred = 0
    if options.labels == "hard" and options.unestimated == "infer" and options.threshold == 0.0 \
            and per_solution.num_rows and not pc.all(complete).as_py():
        # Some steps have no rollouts: label them from the evidence around them (`implied_hard_labels`);
        # a solution still undecided is dropped (counted), never given an invented label.
        per_labels = solution_hard_labels(per_solution, options.threshold, options.unestimated)
        keep = pa.array([lab is not None for lab in per_labels], pa.bool_())
        kept = per_solution.filter(keep)
        kept_labels = [lab for lab in per_labels if lab is not None]
        inferred = sum(1 for lab, ok in zip(per_labels, complete.to_pylist()) if lab is not None and not ok)
        labels = pa.array(kept_labels, pa.list_(pa.bool_()))
        values, schema, warned = labels.flatten(), SCHEMA_HARD, []
    else:
        # A solution with any step lacking an MC estimate has no complete label sequence: it is dropped
        # (counted in stats), never given an invented label.
        kept = per_solution.filter(complete)
        mc_lists = kept["mc_value_list"].combine_chunks() if kept.num_rows else pa.array([], pa.list_(pa.float64()))
        flat = mc_lists.flatten()
        offsets = _offsets(mc_lists)
        if options.labels == "hard":
            values, schema, warned = hard_labels(flat, options.threshold), SCHEMA_HARD, []
        else:
            values, schema, warned = flat.cast(pa.float64()), SCHEMA_SOFT, [warn_soft_labels()]
        labels = pa.ListArray.from_arrays(offsets, values)
    questions = [data.problem(pid, record=f"steps[solution_id={sid}]")["question"]
                 for pid, sid in zip(kept["problem_id"].to_pylist(), kept["solution_id"].to_pylist())]
    if options.prompt == "template":
        questions = [data.renderer.user_message(q) for q in questions]
    completions = (kept["step_text_list"].combine_chunks() if kept.num_rows else pa.array([], pa.list_(pa.string()))).cast(pa.list_(pa.string()))
    table = pa.Table.from_arrays([pa.array(questions, pa.string()), completions, labels], schema=schema)
    stats = {"rows": table.num_rows, "steps": len(values), "dropped_solutions_without_mc": per_solution.num_rows - kept.num_rows,
             "solutions_with_inferred_steps": inferred}
    if options.labels == "hard" and len(values):
        stats["positive_fraction"] = round(pc.sum(values).as_py() / len(values), 6)
    return check_columns(ExportResult(table, stats=stats, warnings=warned), schema, NAME)


def _offsets(lists: pa.Array) -> pa.Array:
    """Offsets of a fresh list array over the flattened values (input may be a slice with its own offsets)."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype("int32"))
