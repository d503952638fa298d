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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import (UNESTIMATED_DESCRIPTION, ExportBatch, ExportResult, ExportStream, ReleaseData, Unestimated,
                                  warn_soft_labels)
from storage.exports.labels import LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, adaptive_warning, resolve_step_labels
from storage.exports.stream import (ProblemLookup, StreamConsensus, kept_steps, list_array, np_bool, solution_batches, step_labels,
                                    stream_export)

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
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: TRLPRMOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA_SOFT if options.labels == "soft" else SCHEMA_HARD, _batches(data, options, presort), NAME)


def _batches(data: ReleaseData, options: TRLPRMOptions, presort: bool):  # -> ExportStream.batches
    soft = options.labels == "soft"
    # Soft labels are the raw c/k; MC's opinion for the consensus filter is still the hard rule's first error.
    threshold = 0.0 if soft else options.threshold
    rule = resolve_step_labels(options.step_labels, threshold, NAME)
    schema = SCHEMA_SOFT if soft else SCHEMA_HARD
    consensus = StreamConsensus(options.consensus)
    lookup = ProblemLookup(data.table("problems"))
    columns = ["step_text", *LABEL_COLUMNS] + (["verdicts"] if options.consensus != "none" else [])
    n_rows = 0
    without_mc = inferred = relabelled_soft = n_steps = positives = 0
    rendered: dict[str, str] = {}
    for b in solution_batches(data, columns, presort=presort):
        hard, decided = step_labels(b, rule, threshold, options.unestimated)
        kept, final = consensus.apply(b, hard, decided)
        without_mc += int((~decided).sum())  # no complete label sequence: dropped, never given an invented label
        emit = kept.copy()
        if soft:
            values_ok = np.logical_and.reduceat(np_bool(b.steps.column("mc_value").is_valid()), b.starts[:-1])
            without_mc += int((kept & ~values_ok).sum())
            emit &= values_ok
            # the majority outvoted MC: its c/k would contradict the kept first error
            changed = np.logical_or.reduceat(final != hard, b.starts[:-1])
            relabelled_soft += int((emit & changed).sum())
            emit &= ~changed
        rows, offsets = kept_steps(b, emit)
        k_true = np_bool(pc.not_equal(b.steps.column("mc_k"), 0))
        inferred += int((emit & ~np.logical_and.reduceat(k_true, b.starts[:-1])).sum())
        idx = lookup.rows(b.per_solution("problem_id").filter(emit), b.per_solution("solution_id").filter(emit))
        questions = lookup.column("question", idx)
        if options.prompt == "template":
            qs = questions.to_pylist()
            for q in set(qs) - rendered.keys():
                rendered[q] = data.renderer.user_message(q)
            questions = pa.array([rendered[q] for q in qs], pa.string())
        take = pa.array(rows)
        texts = b.column("step_text").take(take)
        if soft:
            labels = b.column("mc_value").take(take).cast(pa.float64())
        else:
            chosen = final[rows]
            labels = pa.array(chosen, pa.bool_())
            n_steps += len(chosen)
            positives += int(chosen.sum())
        n_steps += 0 if not soft else len(rows)
        n_rows += len(questions)
        yield ExportBatch(pa.RecordBatch.from_arrays(
            [questions.cast(pa.string()), list_array(offsets, texts, pa.list_(pa.string())),
             list_array(offsets, labels, schema.field("labels").type)], schema=schema))
    report = consensus.finish()
    stats = {"rows": n_rows, "steps": n_steps, "step_labels": rule, "dropped_solutions_without_mc": without_mc,
             "solutions_with_inferred_steps": inferred, "consensus": report.as_dict()}
    if relabelled_soft:
        stats["consensus"]["dropped_soft_relabelled"] = relabelled_soft
    if not soft and n_steps:
        stats["positive_fraction"] = round(positives / n_steps, 6)
    warned = [warn_soft_labels()] if soft else []
    if soft and (biased := adaptive_warning(data)):
        warned.append(biased)
    return stats, warned
