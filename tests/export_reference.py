"""Frozen reference: the step exporters as they were before they streamed (commit b98848d), whole tables in
memory with a Python loop per solution. tests/test_export_stream.py checks that the streaming exporters
write byte-identical Parquet and JSONL to these on fixed and on random tables. Not imported by the package."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from storage.consensus import MC, RULES, ConsensusReport, Decision, Opinion, _require, decide, labels_opinion, verdict_opinions
from storage.errors import StorageError
from storage.exports import math_shepherd, prm800k, trl_prm
from storage.exports.base import ExportResult, ReleaseData, check_columns, gc_paused, solutions, warn_soft_labels
from storage.exports.labels import LABEL_COLUMNS, adaptive_warning, resolve_step_labels, solution_labels

# --- trl_prm ------------------------------------------------------------------------------------------

def trl_prm_export(data: ReleaseData, options: trl_prm.TRLPRMOptions) -> ExportResult:
    steps = data.table("steps")
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    soft = options.labels == "soft"
    # Soft labels are the raw c/k; MC's opinion for the consensus filter is still the hard rule's first error.
    rule = resolve_step_labels(options.step_labels, 0.0 if soft else options.threshold, trl_prm.NAME)
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
    schema = trl_prm.SCHEMA_SOFT if soft else trl_prm.SCHEMA_HARD
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
    return check_columns(ExportResult(table, stats=stats, warnings=warned), schema, trl_prm.NAME)


# --- math_shepherd ------------------------------------------------------------------------------------------

def math_shepherd_export(data: ReleaseData, options: math_shepherd.MathShepherdOptions) -> ExportResult:
    steps = data.table("steps")
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    out, dropped, quarantined = [], 0, []
    rule = resolve_step_labels(options.step_labels, options.threshold, math_shepherd.NAME)
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
        if math_shepherd.STEP_TAG in problem["question"]:
            quarantined.append(f"problems[problem_id={pid}]: question")
            continue
        bad = next((i for i, t in enumerate(texts) if math_shepherd.STEP_TAG in t), None)
        if bad is not None:
            quarantined.append(f"steps[solution_id={sid}, step_index={bad}]: step_text")
            continue
        body = [f"{options.step_label.format(i=i + 1)}{t}" for i, t in enumerate(texts)]
        marks = ["+" if good else "-" for good in labels]
        inp = problem["question"] + " " + "\n".join(f"{b} {math_shepherd.STEP_TAG}" for b in body)
        label = problem["question"] + " " + "\n".join(f"{b} {m}" for b, m in zip(body, marks))
        out.append({"input": inp, "label": label, "task": options.task or problem.get("source") or data.dataset})
    table = pa.Table.from_pylist(out, schema=math_shepherd.SCHEMA)
    warned = []
    if quarantined:
        warned.append(f"{len(quarantined)} solution(s) left out because their text contains the step tag {math_shepherd.STEP_TAG!r}, "
                      f"which would misalign the labels (first: {quarantined[0]}).")
    stats = {"rows": table.num_rows, "step_labels": rule, "dropped_solutions_without_mc": dropped,
             "quarantined_step_tag": len(quarantined), "quarantine": quarantined[:100], "consensus": report.as_dict()}
    return check_columns(ExportResult(table, stats=stats, warnings=warned), math_shepherd.SCHEMA, math_shepherd.NAME)


# --- prm800k ------------------------------------------------------------------------------------------

def prm800k_export(data: ReleaseData, options: prm800k.PRM800KOptions) -> ExportResult:
    steps_table = data.table("steps")
    per = solutions(steps_table, ["step_text", *LABEL_COLUMNS])
    rule = resolve_step_labels(options.step_labels, 0.0, prm800k.NAME)
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
            ratings = [(prm800k.rating(v, options) if v else options.neutral) if good else -1
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
        table = pa.Table.from_pylist(out, schema=prm800k.SCHEMA)
    stats = {"rows": table.num_rows, "step_labels": rule, "ratings": {str(k): v for k, v in counts.items()},
             "dropped_solutions_without_mc": dropped, "consensus": report.as_dict()}
    biased = adaptive_warning(data)
    return check_columns(ExportResult(table, jsonl=out, stats=stats, warnings=[biased] if biased else []), prm800k.SCHEMA, prm800k.NAME)




# --- trl_dpo and step_dpo, as they were before they streamed (commit 30144e7): whole pairs table -------------
# (`select_pairs` and `labels.filter_pairs` as they were before the consensus filter streamed, 4d1e441.)


def select_pairs(data: ReleaseData, kinds: list[str] | None, min_margin: float | None,
                 consensus: str = "none") -> tuple[list[dict], dict]:
    """The pairs to export and the consensus report (what the rule kept and dropped)."""
    rows = data.table("pairs").to_pylist()
    if kinds is not None:
        rows = [r for r in rows if r["kind"] in kinds]
    if min_margin is not None:
        rows = [r for r in rows if r["margin"] is not None and r["margin"] >= min_margin]
    return filter_pairs(data, rows, consensus)


def filter_pairs(data: ReleaseData, rows: list[dict[str, Any]], rule: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pairs a consensus ``rule`` keeps (``storage.consensus.pair_keep_mask``: the rejected step is the
    agreed first error of a kept solution, the chosen step is not contradicted), and the report. MC's
    opinion is the first-error rule's (the one the pair makers used)."""
    report = ConsensusReport(rule, unit="pairs")
    if rule == "none":
        report.solutions = report.kept = len(rows)
        return rows, report.as_dict()
    steps = data.table("steps")
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    hard = solution_labels(per, "first-error", 0.0, "infer")
    _, decisions, by_solution = apply_consensus(steps, per, hard, rule)
    mask, dropped = pair_keep_mask(rows, zip(per["problem_id"].to_pylist(), per["step_text_list"].to_pylist(), decisions))
    kept = [r for r, k in zip(rows, mask) if k]
    report.solutions, report.kept, report.dropped = len(rows), len(kept), dropped
    out = report.as_dict()
    out["solutions"] = by_solution.as_dict()
    return kept, out





def trl_dpo_export(data: ReleaseData, options) -> ExportResult:
    from storage.exports import trl_dpo

    r = data.renderer
    out: list[dict] = []
    rows, report = select_pairs(data, options.kinds, options.min_margin, options.consensus)
    for row in rows:
        record = f"pairs[pair_id={row['pair_id']}]"
        question = data.problem(row["problem_id"], record=record)["question"]
        prefix = list(row["prefix_steps"] or [])
        start = len(prefix)
        if options.continuation == "full":
            chosen, rejected = row["full_chosen"] or r.step(start, row["chosen"]), row["full_rejected"] or r.step(start, row["rejected"])
        else:
            chosen, rejected = r.step(start, row["chosen"]), r.step(start, row["rejected"])
        if options.style == "standard":
            out.append({"prompt": r.prompt(question, prefix), "chosen": chosen, "rejected": rejected})
        else:
            opened = r.steps(prefix)
            out.append({"prompt": r.messages(question),
                        "chosen": [{"role": "assistant", "content": opened + chosen}],
                        "rejected": [{"role": "assistant", "content": opened + rejected}]})
    schema = trl_dpo.SCHEMA_STANDARD if options.style == "standard" else trl_dpo.SCHEMA_CONVERSATIONAL
    table = pa.Table.from_pylist(out, schema=schema)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows, "consensus": report}), schema, trl_dpo.NAME)


def step_dpo_export(data: ReleaseData, options) -> ExportResult:
    from storage.exports import step_dpo, trl_dpo

    r = data.renderer
    out = []
    rows, report = select_pairs(data, options.kinds, None, options.consensus)
    for row in rows:
        problem = data.problem(row["problem_id"], record=f"pairs[pair_id={row['pair_id']}]")
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
    table = pa.Table.from_pylist(out, schema=step_dpo.SCHEMA)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows, "consensus": report}), step_dpo.SCHEMA, step_dpo.NAME)


# --- rstar_ppm, as it was before it streamed (commit 30144e7): whole pairs table as dicts --------------------


def rstar_ppm_export(data: ReleaseData, options) -> ExportResult:
    from storage.exports.rstar_ppm import NAME, SCHEMA

    groups: dict[tuple[str, tuple[str, ...]], dict[str, dict[str, float]]] = {}
    for row in data.table("pairs").to_pylist():
        if options.kinds is not None and row["kind"] not in options.kinds:
            continue
        key = (row["problem_id"], tuple(row["prefix_steps"] or []))
        g = groups.setdefault(key, {"pos": {}, "neg": {}})
        cv = row["chosen_value"] if row["chosen_value"] is not None else 1.0
        rv = row["rejected_value"] if row["rejected_value"] is not None else 0.0
        g["pos"][row["chosen"]] = max(cv, g["pos"].get(row["chosen"], cv))
        g["neg"][row["rejected"]] = min(rv, g["neg"].get(row["rejected"], rv))
    r = data.renderer
    out = []
    for (pid, prefix), g in sorted(groups.items()):
        # A step preferred in one pair and dispreferred in another is ambiguous at this prefix: drop it.
        both = set(g["pos"]) & set(g["neg"])
        pos = sorted((s for s in g["pos"] if s not in both), key=lambda s: (-g["pos"][s], s))[: options.max_per_side]
        neg = sorted((s for s in g["neg"] if s not in both), key=lambda s: (g["neg"][s], s))[: options.max_per_side]
        if not pos or not neg:
            continue
        question = data.problem(pid, record=f"pairs[problem_id={pid}]")["question"]
        start = len(prefix)
        out.append({"prompt": r.prompt(question, list(prefix)), "pos": [r.step(start, s) for s in pos],
                    "neg": [r.step(start, s) for s in neg], "pos_count": len(pos), "neg_count": len(neg)})
    table = pa.Table.from_pylist(out, schema=SCHEMA)
    return check_columns(ExportResult(table, stats={"rows": table.num_rows}), SCHEMA, NAME)


# `consensus.pair_keep_mask` as it was before it kept only the bad prefixes (4d1e441).


def pair_keep_mask(pairs: Sequence[Mapping[str, Any]],
                   solutions: Iterable[tuple[str, Sequence[str], Decision]]) -> tuple[list[bool], dict[str, int]]:
    """Which preference pairs a rule keeps, given every solution's (problem_id, step texts, decision).

    A pair (prefix, chosen, rejected) is kept when some kept solution goes through ``prefix + [rejected]``
    with its agreed first error exactly at the rejected step, and no kept solution through
    ``prefix + [chosen]`` has its agreed first error at or before the chosen step (a chosen step that no
    solution of the steps table contains is not contradicted). Pairs with no such solution are dropped as
    ``unconfirmed``, those contradicted as ``chosen contradicted``."""
    # (problem_id, step texts of a prefix) -> set of "is the prefix's last step good", from kept solutions.
    seen: dict[tuple[str, tuple[str, ...]], set[bool]] = {}
    # (problem_id, prefix + [step]) for kept solutions whose agreed first error is that step.
    first_errors: set[tuple[str, tuple[str, ...]]] = set()
    for pid, texts, d in solutions:
        if not d.keep or d.first_error is None:
            continue
        texts = tuple(texts)
        for n in range(1, len(texts) + 1):
            good = d.first_error == -1 or n - 1 < d.first_error
            seen.setdefault((pid, texts[:n]), set()).add(good)
        if d.first_error >= 0:
            first_errors.add((pid, texts[: d.first_error + 1]))
    keep, dropped = [], Counter()
    for p in pairs:
        prefix = tuple(p["prefix_steps"] or ())
        if (p["problem_id"], prefix + (p["rejected"],)) not in first_errors:
            keep.append(False)
            dropped["unconfirmed"] += 1
        elif False in seen.get((p["problem_id"], prefix + (p["chosen"],)), set()):
            keep.append(False)
            dropped["chosen contradicted"] += 1
        else:
            keep.append(True)
    return keep, dict(dropped)


# --- the per-solution consensus (storage.consensus / storage.exports.labels before the exporters streamed) ---
# The streamed exporters decide column-wise (`stream.StreamConsensus`); these per-solution versions are what
# they are checked against, so they live here, with the frozen exporters that use them.


def apply_rule(rule: str, solution_ids: Sequence[str], mc: Sequence[Opinion],
               opinions: Mapping[str, Mapping[str, Opinion]]) -> tuple[list[Decision], ConsensusReport]:
    """Decisions for solutions in order, given MC's opinion of each and the stored verifiers' opinions
    (``verdict_opinions``). Raises if the rule's partner verifier left no verdict anywhere."""
    if rule not in RULES:
        raise StorageError(f"`consensus` must be one of {list(RULES)}, got {rule!r}.", field="consensus", value=rule)
    if len(solution_ids):
        _require(rule, opinions)
    report = ConsensusReport(rule)
    out = []
    for sid, m in zip(solution_ids, mc):
        d = decide(rule, {**opinions.get(sid, {}), MC: m})
        report.solutions += 1
        if d.keep:
            report.kept += 1
            report.relabelled += d.first_error != m
        else:
            report.dropped[d.reason] = report.dropped.get(d.reason, 0) + 1
        out.append(d)
    return out, report


def apply_consensus(steps: pa.Table, per_solution: pa.Table, labels: Sequence[list[bool] | None],
                    rule: str) -> tuple[list[list[bool] | None], list[Decision], ConsensusReport]:
    """The consensus ``rule`` over solutions labelled ``labels`` (MC's opinion is the first step they call
    bad). Returns each solution's final labels (None: dropped), the decisions and the report. A kept solution
    keeps MC's labels when the agreed first error is MC's own; one the majority relabelled gets the agreed
    first error's labels (good before it, bad from it on)."""
    mc: list[Opinion] = [labels_opinion(lab) for lab in labels]
    opinions = verdict_opinions(steps) if rule != "none" else {}
    decisions, report = apply_rule(rule, per_solution["solution_id"].to_pylist(), mc, opinions)
    out: list[list[bool] | None] = []
    for lab, m, d in zip(labels, mc, decisions):
        if not d.keep or lab is None:
            out.append(None)
        elif d.first_error == m:
            out.append(list(lab))
        else:
            fe = d.first_error
            out.append([fe == -1 or i < fe for i in range(len(lab))])
    return out, decisions, report
