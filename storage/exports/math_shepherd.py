"""Math-Shepherd export (peiyi9979/Math-Shepherd columns): ``input, label, task``.

``input`` is the question followed by the steps, each step ending with the step tag ``ки``; ``label`` is
the same text with each tag replaced by ``+`` or ``-`` (hard labels by ``step_labels``: by default good iff
before the solution's ``first_error_index``; ``per-step`` is ``mc_value > threshold``, the paper's "any
rollout correct" at threshold 0). ``task`` names the source (GSM8K, MATH, …). ``consensus`` keeps only the
solutions on which MC agrees with the judge / step checks (``storage.consensus``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import UNESTIMATED_DESCRIPTION, ExportBatch, ExportResult, ExportStream, ReleaseData, Unestimated
from storage.exports.labels import LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, resolve_step_labels
from storage.exports.stream import (ProblemLookup, StreamConsensus, kept_steps, list_array, np_bool, solution_batches,
                                    step_labels, stream_export)

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
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: MathShepherdOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA, _batches(data, options, presort), NAME)


def _batches(data: ReleaseData, options: MathShepherdOptions, presort: bool):  # -> ExportStream.batches
    rule = resolve_step_labels(options.step_labels, options.threshold, NAME)
    consensus = StreamConsensus(options.consensus)
    lookup = ProblemLookup(data.table("problems"))
    columns = ["step_text", *LABEL_COLUMNS] + (["verdicts"] if options.consensus != "none" else [])
    heads: list[str] = []  # options.step_label for step i + 1, as far as any solution reaches
    n_rows = 0
    dropped = 0
    quarantined: list[str] = []
    for b in solution_batches(data, columns, presort=presort):
        hard, decided = step_labels(b, rule, options.threshold, options.unestimated)
        kept, final = consensus.apply(b, hard, decided)
        dropped += int((~decided).sum())
        sids = b.per_solution("solution_id")
        pids = b.per_solution("problem_id")
        idx = lookup.rows(pids.filter(kept), sids.filter(kept))
        questions = lookup.column("question", idx)
        # A tag inside the question or a step would be read as an extra step slot and shift every later
        # label, so such a solution is left out (counted, with a warning) rather than emitted misaligned;
        # one odd record does not stop the export.
        texts = b.steps.column("step_text").combine_chunks()
        tag_q = np_bool(pc.match_substring(questions, STEP_TAG))
        tag_step = np_bool(pc.match_substring(texts, STEP_TAG))
        tag_sol = np.logical_or.reduceat(tag_step, b.starts[:-1])[kept] if b.count else np.zeros(0, bool)
        emit_of_kept = ~tag_q & ~tag_sol
        if not emit_of_kept.all():
            kept_ids = np.flatnonzero(kept)
            for j in np.flatnonzero(~emit_of_kept).tolist():
                sol = int(kept_ids[j])
                if tag_q[j]:
                    quarantined.append(f"problems[problem_id={pids[sol].as_py()}]: question")
                else:
                    bad = int(np.flatnonzero(tag_step[b.starts[sol]: b.starts[sol + 1]])[0])
                    quarantined.append(f"steps[solution_id={sids[sol].as_py()}, step_index={bad}]: step_text")
        emit = kept.copy()
        emit[kept] = emit_of_kept
        rows, offsets = kept_steps(b, emit)
        idx = idx.filter(pa.array(emit_of_kept))
        questions = questions.filter(pa.array(emit_of_kept))
        pos = b.pos[rows]
        while len(heads) <= (int(pos.max()) if len(pos) else -1):
            heads.append(options.step_label.format(i=len(heads) + 1))
        body = pc.binary_join_element_wise(pa.array(heads, pa.string()).take(pa.array(pos)), texts.take(pa.array(rows)), "")
        marks = pc.if_else(pa.array(final[rows]), "+", "-")
        inp = pc.binary_join_element_wise(body, STEP_TAG, " ")
        lab = pc.binary_join_element_wise(body, marks, " ")
        joined = [pc.binary_join_element_wise(questions, pc.binary_join(list_array(offsets, x), "\n"), " ") for x in (inp, lab)]
        if options.task:
            task = pa.repeat(pa.scalar(options.task), len(questions))
        else:
            source = lookup.column("source", idx)
            has = pc.fill_null(pc.not_equal(source, ""), False)
            task = pc.if_else(has, source, pa.scalar(data.dataset, pa.string()))
        n_rows += len(task)
        yield ExportBatch(pa.RecordBatch.from_arrays([*joined, task], schema=SCHEMA))
    report = consensus.finish()
    warned = []
    if quarantined:
        warned.append(f"{len(quarantined)} solution(s) left out because their text contains the step tag {STEP_TAG!r}, "
                      f"which would misalign the labels (first: {quarantined[0]}).")
    stats = {"rows": n_rows, "step_labels": rule, "dropped_solutions_without_mc": dropped,
             "quarantined_step_tag": len(quarantined), "quarantine": quarantined[:100], "consensus": report.as_dict()}
    return stats, warned
