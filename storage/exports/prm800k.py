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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import UNESTIMATED_DESCRIPTION, ExportBatch, ExportResult, ExportStream, ReleaseData, Unestimated
from storage.exports import stream as stream_module
from storage.exports.labels import LABEL_COLUMNS, STEP_LABELS_DESCRIPTION, StepLabels, adaptive_warning, resolve_step_labels
from storage.exports.stream import (ProblemLookup, StreamConsensus, join_pieces, json_escaped, json_strings, list_array,
                                    np_bool, solution_batches, step_labels, stream_export)

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
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: PRM800KOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA, _batches(data, options, presort), NAME, jsonl=True)


def _ratings(values: pa.Array, good: np.ndarray, options: PRM800KOptions) -> np.ndarray:
    """``rating`` per step, column-wise: a bad step −1; a good one without a positive MC value of its own (no
    rollouts, or all of its own failed while one below it succeeded) has nothing to rate +1 on: neutral."""
    truthy = np_bool(pc.not_equal(values, 0.0))  # `if v`: null and 0.0 are falsy, NaN is not
    v = np.asarray(pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False), np.float64)
    with np.errstate(invalid="ignore"):
        by_value = np.where(v <= 0.0, -1, np.where(v >= options.positive_min, 1, options.neutral))
    return np.where(good, np.where(truthy, by_value, options.neutral), -1).astype(np.int8)


def batch_rows() -> int:
    """Steps per batch: a quarter of the other step exports' (``stream.BATCH_ROWS``, read when called, so a
    test that shrinks it shrinks this). A prm800k step carries ~190 bytes of JSONL and a nested Parquet row,
    so a 16Ki-step batch holds about the output of a 64Ki-step trl-prm batch; and smaller batches reuse
    memory the allocator still holds instead of touching fresh pages, which is dear on this machine. At 1M
    steps in a fresh process (2 cores, load 3-4): 16Ki steps 1.55-2.08 s of CPU and 188-203 MB peak RSS
    growth, 64Ki 2.15-2.44 s and 262-281 MB; 8Ki costs more again (per-batch overhead, 2.3-2.8 s)."""
    return max(1, stream_module.BATCH_ROWS // 4)


def _batches(data: ReleaseData, options: PRM800KOptions, presort: bool):  # -> ExportStream.batches
    rule = resolve_step_labels(options.step_labels, 0.0, NAME)
    consensus = StreamConsensus(options.consensus)
    lookup = ProblemLookup(data.table("problems"))
    columns = ["step_text", *LABEL_COLUMNS] + (["verdicts"] if options.consensus != "none" else [])
    n_rows = 0
    dropped = 0
    counts = {-1: 0, 0: 0, 1: 0}
    for b in solution_batches(data, columns, batch_rows=batch_rows(), presort=presort):
        hard, decided = step_labels(b, rule, 0.0, options.unestimated)
        kept, final = consensus.apply(b, hard, decided)
        dropped += int((~decided).sum())
        ratings = _ratings(b.column("mc_value"), final, options)
        keep_step = kept[b.sol]
        if options.stop_at_first_error:
            # Each solution ends at its first −1 step, as PRM800K labellers did.
            big = np.iinfo(np.int64).max
            first_bad = (np.minimum.reduceat(np.where(ratings == -1, b.pos, big), b.starts[:-1])
                         if b.count else np.zeros(0, np.int64))
            keep_step &= b.pos <= first_bad[b.sol]
            finish_found = first_bad != big
        else:
            finish_found = np.zeros(b.count, bool)
        rows = np.flatnonzero(keep_step)
        lengths = np.bincount(b.sol[rows], minlength=b.count)[kept]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        r = ratings[rows]
        for value in (-1, 0, 1):
            counts[value] += int((r == value).sum())
        sids = b.per_solution("solution_id").filter(kept)
        idx = lookup.rows(b.per_solution("problem_id").filter(kept), sids)
        question, answer = lookup.column("question", idx), lookup.column("answer", idx)
        found = finish_found[kept]
        finish = pc.if_else(pa.array(found), "found_error", "solution")
        texts = b.column("step_text").take(pa.array(rows))
        n, m = len(rows), len(sids)
        completion = pa.StructArray.from_arrays([texts, pa.array(r, pa.int8()), pa.array(np.zeros(n, bool))],
                                                fields=list(_COMPLETION))
        step = pa.StructArray.from_arrays([list_array(np.arange(n + 1), completion, pa.list_(_COMPLETION)),
                                           pa.nulls(n, pa.string()), pa.array(np.zeros(n, np.int32))], fields=list(_STEP))
        n_rows += m
        yield ExportBatch(pa.RecordBatch.from_arrays([
            pa.repeat(pa.scalar("stepforge-mc"), m), pa.repeat(pa.scalar(False), m), pa.repeat(pa.scalar(False), m),
            pa.StructArray.from_arrays([question, answer], fields=list(SCHEMA.field("question").type)),
            pa.StructArray.from_arrays([list_array(offsets, step, pa.list_(_STEP)), finish],
                                       fields=list(SCHEMA.field("label").type)),
            sids], schema=SCHEMA), _json_lines(texts, r, offsets, found, lookup.json_column("question", idx),
                                           lookup.json_column("answer", idx), sids))
    report = consensus.finish()
    stats = {"rows": n_rows, "step_labels": rule, "ratings": {str(k): v for k, v in counts.items()},
             "dropped_solutions_without_mc": dropped, "consensus": report.as_dict()}
    biased = adaptive_warning(data)
    return stats, [biased] if biased else []


class _Pieces:
    """The constant text of a JSONL record, cut at every variable part, as the first strings of the ``source``
    that ``join_pieces`` gathers from. A record (``json.dumps(record, ensure_ascii=False, sort_keys=True)``):

        HEAD[finish]  (OPEN[prev, rating, has_text]  text)*  TAIL[prev]  answer  PROBLEM  question  SID  id  END

    where ``prev`` says how the step before ended (0: no step before, 1: a quoted text, 2: a null text),
    so each step's closing bracket and the ``", "`` between steps ride in the next piece, and a step's text
    needs its quotes only in the constants around it."""

    def __init__(self) -> None:
        consts: list[str] = []

        def add(text: str) -> int:
            consts.append(text)
            return len(consts) - 1

        after = ("", '"}], "human_completion": null}', '}], "human_completion": null}')  # by prev
        self.head = np.array([add('{"is_initial_screening_question": false, "is_quality_control_question": false, '
                                  f'"label": {{"finish_reason": "{f}", "steps": [') for f in ("solution", "found_error")])
        self.open = np.array([[[add(after[prev] + (", " if prev else "") + '{"chosen_completion": 0, "completions": '
                                    f'[{{"flagged": false, "rating": {r}, "text": ' + ('"' if text else "null"))
                                for text in (False, True)] for r in (-1, 0, 1)] for prev in range(3)])
        self.tail = np.array([add(after[prev] + ']}, "labeler": "stepforge-mc", "question": {"ground_truth_answer": ')
                              for prev in range(3)])
        self.problem, self.sid, self.end, self.empty = (add(', "problem": '), add('}, "solution_id": '), add("}\n"),
                                                        add(""))
        self.consts = pa.array(consts, pa.string())


_PIECES = _Pieces()


def _json_lines(texts: pa.Array, ratings: np.ndarray, offsets: np.ndarray, found_error: np.ndarray,
                question: pa.Array, answer: pa.Array, sids: pa.Array) -> pa.Array:
    """Each record's JSONL line, as ``json.dumps(record, ensure_ascii=False, sort_keys=True) + "\\n"`` writes it,
    built column-wise: the piece indices of every line laid out with NumPy, then one ``join_pieces`` copy
    (three nested joins copied the ~190 MB of lines per 1M steps three times). ``question`` and ``answer``
    come JSON-quoted (``ProblemLookup.json_column``)."""
    k, n, m = len(_PIECES.consts), len(texts), len(sids)
    texts = json_escaped(texts)
    has_text = (np.asarray(texts.is_valid().to_numpy(zero_copy_only=False), bool) if texts.null_count
                else np.ones(n, bool))
    lengths = np.diff(offsets)
    sol = np.repeat(np.arange(m), lengths)
    # Each line: HEAD, two pieces per step (OPEN, text), then 7 (TAIL, answer, PROBLEM, question, SID, id, END).
    line_starts = 2 * offsets + 8 * np.arange(m + 1)
    pieces = np.empty(line_starts[-1], np.int32)
    pieces[line_starts[:-1]] = _PIECES.head[found_error.astype(np.int64)]
    prev = np.where(has_text, 1, 2)
    step_prev = np.zeros(n, np.int64)
    step_prev[1:] = prev[:-1]
    step_prev[offsets[:-1][lengths > 0]] = 0  # a solution's first step
    at = 2 * np.arange(n) + 8 * sol + 1  # = line_starts[sol] + 1 + 2 × (the step's place in its line)
    pieces[at] = _PIECES.open.ravel()[(step_prev * 3 + ratings + 1) * 2 + has_text]  # one flat index: cheaper
    pieces[at + 1] = np.where(has_text, k + np.arange(n), _PIECES.empty)
    last_prev = np.where(lengths > 0, prev[np.maximum(offsets[1:] - 1, 0)] if n else 0, 0)
    at = line_starts[1:] - 7
    rows = np.arange(m)
    pieces[at] = _PIECES.tail[last_prev]
    pieces[at + 1] = k + n + rows
    pieces[at + 2] = _PIECES.problem
    pieces[at + 3] = k + n + m + rows
    pieces[at + 4] = _PIECES.sid
    pieces[at + 5] = k + n + 2 * m + rows
    pieces[at + 6] = _PIECES.end
    # A null text is never taken (its OPEN piece writes `null`), so it needs no filling.
    return join_pieces([_PIECES.consts, texts, answer, question, json_strings(sids)], pieces, line_starts)
