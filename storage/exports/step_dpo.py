"""Step-DPO export with the published column set (xinlai/Math-Step-DPO-10K): ``dataset, prompt,
initial_reason_steps, chosen, rejected, full_chosen, full_rejected, answer``.

``prompt`` is the problem rendered with the build's template and no steps; ``initial_reason_steps`` the
shared correct prefix in the step format, so ``prompt + initial_reason_steps + chosen`` is the text the
policy continued. ``chosen``/``rejected`` are the one step (in the step format), ``full_*`` the rest of the
solution from that step, as the pair makers stored them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from storage.consensus import CONSENSUS_DESCRIPTION, Rule
from storage.exports.base import ExportResult, ExportStream, ReleaseData, problem_of
from storage.exports.pair_columns import PairColumns
from storage.exports.pair_stream import pair_record_batches
from storage.exports.stream import stream_export

NAME = "step-dpo"
SCHEMA = pa.schema([(c, pa.string()) for c in
                    ("dataset", "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer")])


class StepDPOOptions(BaseModel):
    """Options of the ``step-dpo`` export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kinds: list[str] = Field(["first_error"], description="Pair kinds to keep; Step-DPO's own are first-error pairs.")
    dataset_column: str | None = Field(None, description="Value of the `dataset` column; default each problem's `source`.")
    consensus: Rule = Field("none", description=CONSENSUS_DESCRIPTION + " For pairs: a pair is kept when its "
                            "rejected step is the agreed first error of a kept solution and no kept solution "
                            "calls its chosen step bad.")


def export(data: ReleaseData, options: StepDPOOptions) -> ExportResult:
    return stream_export(lambda presort: stream(data, options, presort).collect())


def stream(data: ReleaseData, options: StepDPOOptions, presort: bool = False) -> ExportStream:
    return ExportStream(SCHEMA, _batches(data, options, presort), NAME)


def _batches(data: ReleaseData, options: StepDPOOptions, presort: bool):  # -> ExportStream.batches
    return (yield from pair_record_batches(data, options.kinds, None, options.consensus, SCHEMA,
                                           lambda rows, problems: _records(data, options, rows, problems), presort,
                                           lambda cols: _columns(data, options, cols)))


def _columns(data: ReleaseData, options: StepDPOOptions, cols: PairColumns) -> dict[str, pa.Array]:
    """``_records`` column-wise: what depends on the problem alone once per problem, the steps as string kernels."""
    r = data.renderer
    dataset = cols.per_problem(lambda source: options.dataset_column or source or data.dataset, ["source"])
    prompt = cols.prompt_heads(lambda question: r.prompt(question, []))  # a plain head is the prompt of no steps
    chosen, rejected = cols.next_step("chosen"), cols.next_step("rejected")
    return {"dataset": dataset, "prompt": prompt, "initial_reason_steps": cols.prefix_text(),
            "chosen": chosen, "rejected": rejected,
            "full_chosen": cols.stored_or("full_chosen", chosen), "full_rejected": cols.stored_or("full_rejected", rejected),
            "answer": pc.coalesce(cols.t.column("answer").combine_chunks(), cols.per_problem(lambda a: a, ["answer"]))}


def _records(data: ReleaseData, options: StepDPOOptions, rows: list[dict], problems: dict[str, dict]) -> list[dict]:
    r = data.renderer
    out = []
    for row in rows:
        problem = problem_of(problems, row["problem_id"], f"pairs[pair_id={row['pair_id']}]")
        prefix = list(row["prefix_steps"] or [])
        start = len(prefix)
        out.append({
            "dataset": options.dataset_column or problem.get("source") or data.dataset,
            "prompt": r.prompt(problem["question"], []),
            "initial_reason_steps": r.steps(prefix),
            "chosen": r.step(start, row["chosen"]),
            "rejected": r.step(start, row["rejected"]),
            "full_chosen": row["full_chosen"] or r.step(start, row["chosen"]),
            "full_rejected": row["full_rejected"] or r.step(start, row["rejected"]),
            "answer": row["answer"] if row["answer"] is not None else problem.get("answer"),
        })
    return out
