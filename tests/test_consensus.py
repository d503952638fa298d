"""Consensus rules (storage/consensus.py) on first-error opinions, and the exports that apply them: what is
kept, what is dropped and why, MC outvoted by the majority, pairs confirmed by kept solutions, and every
export with every rule loading with `datasets.load_dataset("parquet", ...)`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pytest

from storage.consensus import (NO_OPINION, RULES, Decision, agreement, decide, first_error_opinion, verdict_opinions,
                               verifier_opinions)
from storage.errors import StorageError
from storage.exports import EXPORTERS, parse_options, run_export
from storage.exports.base import ReleaseData, SoftLabelWarning
from storage.objectstore import open_store
from storage.schema import VERDICT, to_table

MANIFEST = {"dataset": "demo", "version": 1, "content_hash": "abc",
            "config": {"prompt": {"family": "completion", "template": "Q: {{ question }}\nA:\n{{ steps }}",
                                  "step_format": {"separator": "\n", "label": "Step {i}: "}}}}


@pytest.mark.parametrize("statuses,opinion", [
    (["valid", "valid"], -1),
    (["valid", "invalid", "valid"], 1),
    (["invalid", "error"], 0),  # an error after the first invalid step does not matter
    (["valid", "timeout", "invalid"], None),  # undecided before any invalid: no opinion
    (["error"], None),
    (["valid", None], None),  # a step without a verdict
    (["none", "none"], None),  # nothing checked: no opinion, not a clean bill
    (["none", "valid"], -1),
    (["none", "invalid"], 1),
    ([], None),
])
def test_first_error_opinion(statuses, opinion):
    assert first_error_opinion(statuses) == opinion


@pytest.mark.parametrize("rule,opinions,decision", [
    ("none", {"mc": 2, "judge": 0}, Decision(True, 2, "kept")),
    ("none", {"mc": None}, Decision(False, None, "mc undecided")),
    ("mc-and-judge", {"mc": 2, "judge": 2, "check": 0}, Decision(True, 2, "kept")),
    ("mc-and-judge", {"mc": -1, "judge": -1}, Decision(True, -1, "kept")),
    ("mc-and-judge", {"mc": 2, "judge": 1}, Decision(False, None, "disagree")),
    ("mc-and-judge", {"mc": 2, "judge": None}, Decision(False, None, "judge undecided")),
    ("mc-and-judge", {"mc": 2}, Decision(False, None, "judge undecided")),
    ("mc-and-judge", {"mc": None, "judge": 2}, Decision(False, None, "mc undecided")),
    ("mc-and-check", {"mc": 1, "judge": 0, "check": 1}, Decision(True, 1, "kept")),
    ("majority", {"mc": 3, "judge": 1, "check": 1}, Decision(True, 1, "kept")),  # MC outvoted
    ("majority", {"mc": 3, "judge": 1, "check": None}, Decision(False, None, "no majority")),
    ("majority", {"mc": -1, "judge": None, "check": -1}, Decision(True, -1, "kept")),
    ("majority", {"mc": 3, "judge": None}, Decision(False, None, "too few opinions")),
    ("majority", {"mc": 0, "judge": 1, "check": 2, "lean": 1}, Decision(False, None, "no majority")),  # 2 of 4 is no majority
    ("majority", {"mc": 0, "judge": 1, "check": 1, "lean": 1}, Decision(True, 1, "kept")),
    ("majority", {"mc": 0, "judge": 1, "check": 0, "lean": 1}, Decision(False, None, "no majority")),
    ("mc-and-formal", {"mc": 1, "judge": 0, "lean": 1}, Decision(True, 1, "kept")),
    ("mc-and-formal", {"mc": 1, "lean": 0}, Decision(False, None, "disagree")),
    ("mc-and-formal", {"mc": 1, "lean": None}, Decision(False, None, "lean undecided")),  # a Lean timeout
])
def test_rules(rule, opinions, decision):
    assert decide(rule, opinions) == decision


def _v(verifier, status):
    return {"verifier": verifier, "version": "1", "status": status, "score": None, "detail": None}


# p1 "2+3*4?" (answer 14). Solution: (texts, mc_c per step of k=4, stored first_error_index, judge, arith-check,
# lean).
SOLUTIONS = {
    "s1": (["3 * 4 = 12", "12 + 2 = 14"], [3, 4], None, ["valid", "valid"], ["valid", "valid"],
           ["valid", "valid"]),                                                     # all say -1
    "s2": (["2 + 3 = 5", "5 * 4 = 20"], [0, 0], 0, ["invalid", "none"], ["valid", "invalid"],
           ["invalid", "none"]),                                                    # mc 0, judge 0, check 1, lean 0
    "s3": (["3 * 4 = 12", "12 + 3 = 15"], [2, 0], 1, ["invalid", "none"], ["invalid", "valid"],
           ["invalid", "none"]),                                                    # mc 1, judge 0, check 0, lean 0
    "s4": (["3 * 4 = 12", "12 + 2 = 14 ok"], [4, 1], None, ["error", "error"], ["valid", "valid"],
           ["timeout", "timeout"]),                                                 # mc -1, judge ?, check -1, lean ?
    "s5": (["3 * 4 = 13", "13 + 2 = 15"], [0, 0], 0, ["invalid", "none"], ["invalid", "valid"],
           ["invalid", "none"]),                                                    # all say 0
}
EXPECTED_KEEP = {
    "none": {"s1": -1, "s2": 0, "s3": 1, "s4": -1, "s5": 0},
    "mc-and-judge": {"s1": -1, "s2": 0, "s5": 0},
    "mc-and-check": {"s1": -1, "s4": -1, "s5": 0},
    "mc-and-formal": {"s1": -1, "s2": 0, "s5": 0},  # s3: Lean and MC disagree; s4: Lean timed out (no opinion)
    "majority": {"s1": -1, "s2": 0, "s3": 0, "s4": -1, "s5": 0},  # s3 relabelled: judge and check outvote MC
}


def _steps(with_verdicts: bool = True) -> pa.Table:
    rows, verdicts = [], []
    for sid, (texts, cs, fe, judge, arith, _) in SOLUTIONS.items():
        for i, (text, c) in enumerate(zip(texts, cs)):
            rows.append({"problem_id": "p1", "solution_id": sid, "step_index": i, "step_text": text, "char_start": 0,
                         "char_end": len(text), "mc_k": 4, "mc_c": c, "mc_value": c / 4, "q_value": None, "advantage": None,
                         "first_error_index": fe, "judge_label": None, "formal_label": None, "consensus": None,
                         "label_source": "mc"})
    table = to_table("steps", rows)
    if not with_verdicts:
        return table.drop_columns(["verdicts"]) if "verdicts" in table.column_names else table
    by_key = {(sid, i): [_v("judge", j), _v("arith-check", a), _v("lean", f)]
              for sid, (_, _, _, judge, arith, lean) in SOLUTIONS.items()
              for i, (j, a, f) in enumerate(zip(judge, arith, lean))}
    for sid, i in zip(table["solution_id"].to_pylist(), table["step_index"].to_pylist()):
        verdicts.append(by_key[(sid, i)])
    column = pa.array(verdicts, pa.list_(VERDICT))
    if "verdicts" in table.column_names:  # once the contract carries the column
        return table.set_column(table.column_names.index("verdicts"), "verdicts", column)
    return table.append_column("verdicts", column)


def _problems():
    return to_table("problems", [{"problem_id": "p1", "source": "toy", "domain": "math", "question": "2+3*4?", "answer": "14",
                                  "header": None, "formal_statement": None, "metadata": "{}"}])


def _pair(prefix, chosen, rejected, kind="first_error"):
    return {"pair_id": f"{len(prefix)}-{chosen}-{rejected}", "problem_id": "p1", "prompt": "unused", "prefix_steps": prefix,
            "chosen": chosen, "rejected": rejected, "chosen_value": 1.0, "rejected_value": 0.0, "margin": 1.0,
            "full_chosen": None, "full_rejected": None, "answer": "14", "kind": kind, "group_id": None, "rank": None}


PAIRS = [
    _pair([], "3 * 4 = 12", "2 + 3 = 5"),                       # rejected = s2's first error (step 0)
    _pair(["3 * 4 = 12"], "12 + 2 = 14", "12 + 3 = 15"),         # rejected = s3's step 1, MC's first error only
    _pair([], "4 * 3 = 12", "3 * 4 = 13"),                       # rejected = s5's first error, which all agree on
]
EXPECTED_PAIRS = {
    "none": [True, True, True],
    "mc-and-judge": [True, False, True],   # s3 dropped: its step 1 is confirmed by nobody
    "mc-and-check": [False, False, True],  # s2 dropped (MC 0, check 1), s3 dropped
    "mc-and-formal": [True, False, True],  # as mc-and-judge: Lean agrees with MC on s2 and s5, not on s3
    "majority": [False, False, True],      # s2 kept at 0, but s3 (kept at 0 by the majority) calls "3 * 4 = 12" bad
}


def _data(**kw) -> ReleaseData:
    return ReleaseData(MANIFEST, {"problems": _problems(), "steps": kw.get("steps", _steps()),
                                  "pairs": to_table("pairs", PAIRS)})


def test_verdict_opinions_per_verifier_and_merged_step_checks():
    ops = verdict_opinions(_steps())
    assert ops == {"s1": {"judge": -1, "check": -1, "lean": -1}, "s2": {"judge": 0, "check": 1, "lean": 0},
                   "s3": {"judge": 0, "check": 0, "lean": 0}, "s4": {"judge": None, "check": -1, "lean": None},
                   "s5": {"judge": 0, "check": 0, "lean": 0}}
    assert verdict_opinions(_steps(with_verdicts=False)) == {}
    # The two step checks merge per step: invalid wins, then error/timeout, then valid.
    two = _steps().slice(0, 2).set_column(
        _steps().column_names.index("verdicts"), "verdicts",
        pa.array([[_v("arith-check", "valid"), _v("code-check", "none")],
                  [_v("arith-check", "none"), _v("code-check", "invalid")]], pa.list_(VERDICT)))
    assert verdict_opinions(two) == {"s1": {"check": 1}}


@pytest.mark.parametrize("rule", RULES)
def test_trl_prm_keeps_what_the_rule_keeps_and_reports_it(rule):
    result = EXPORTERS["trl-prm"].fn(_data(), parse_options("trl-prm", {"consensus": rule}))
    rows = result.table.to_pylist()
    got = {tuple(r["completions"]): r["labels"] for r in rows}
    want = EXPECTED_KEEP[rule]
    assert len(rows) == len(want)
    for sid, fe in want.items():
        texts = tuple(SOLUTIONS[sid][0])
        assert got[texts] == [fe == -1 or i < fe for i in range(len(texts))], sid
    report = result.stats["consensus"]
    assert report["rule"] == rule and report["total"] == 5 and report["kept"] == len(want)
    assert sum(report["dropped"].values()) == 5 - len(want)
    assert report["relabelled"] == (1 if rule == "majority" else 0)
    assert f"consensus {rule}: kept {len(want)} of 5 solutions" in report["line"]


def test_reasons_are_counted_and_soft_labels_never_contradict_the_kept_first_error():
    report = EXPORTERS["math-shepherd"].fn(_data(), parse_options("math-shepherd", {"consensus": "mc-and-judge"})).stats["consensus"]
    assert report["dropped"] == {"disagree": 1, "judge undecided": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoftLabelWarning)
        soft = EXPORTERS["trl-prm"].fn(_data(), parse_options("trl-prm", {"consensus": "majority", "labels": "soft"}))
    # s3's c/k say its step 0 is good (0.5), the majority says bad: such a solution is left out of soft labels.
    assert soft.table.num_rows == 4 and soft.stats["consensus"]["dropped_soft_relabelled"] == 1
    prm = EXPORTERS["prm800k"].fn(_data(), parse_options("prm800k", {"consensus": "majority", "stop_at_first_error": False}))
    s3 = next(r for r in prm.jsonl if r["solution_id"] == "s3")
    assert [s["completions"][0]["rating"] for s in s3["label"]["steps"]] == [-1, -1]


@pytest.mark.parametrize("rule", RULES)
def test_pair_exports_keep_pairs_confirmed_by_kept_solutions(rule):
    for fmt in ("trl-dpo", "step-dpo"):
        result = EXPORTERS[fmt].fn(_data(), parse_options(fmt, {"consensus": rule}))
        assert result.table.num_rows == sum(EXPECTED_PAIRS[rule]), (fmt, rule)
        report = result.stats["consensus"]
        assert report["unit"] == "pairs" and report["kept"] == result.table.num_rows and report["total"] == 3
    if rule == "majority":
        assert report["dropped"] == {"chosen contradicted": 1, "unconfirmed": 1}


def test_pair_keep_mask_directly():
    from export_reference import pair_keep_mask

    decisions = [("p1", SOLUTIONS[s][0], Decision(True, fe, "kept")) for s, fe in EXPECTED_KEEP["mc-and-judge"].items()]
    assert pair_keep_mask(PAIRS, decisions) == ([True, False, True], {"unconfirmed": 1})
    assert pair_keep_mask(PAIRS, []) == ([False, False, False], {"unconfirmed": 3})


def test_a_rule_without_its_verifier_in_the_release_is_a_clear_error():
    data = _data(steps=_steps(with_verdicts=False))
    for fmt in ("trl-prm", "math-shepherd", "prm800k", "step-dpo", "trl-dpo"):
        with pytest.raises(StorageError, match="needs judge verdicts"):
            EXPORTERS[fmt].fn(data, parse_options(fmt, {"consensus": "mc-and-judge"}))
    with pytest.raises(StorageError, match="step-check"):
        EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"consensus": "mc-and-check"}))
    with pytest.raises(StorageError, match="needs Lean .*`formal` section"):
        EXPORTERS["step-dpo"].fn(data, parse_options("step-dpo", {"consensus": "mc-and-formal"}))
    # Majority over what exists: MC alone is no majority, so nothing is kept, and the report says why.
    report = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"consensus": "majority"})).stats["consensus"]
    assert report["kept"] == 0 and report["dropped"] == {"too few opinions": 5}
    with pytest.raises(StorageError, match="consensus"):
        decide("unanimous", {})


def test_agreement_counts_only_solutions_both_decided():
    rows = [{"mc": 0, "judge": 0, "check": 1}, {"mc": -1, "judge": None, "check": -1}, {"mc": 2, "judge": 1, "check": None}]
    got = {(r["a"], r["b"]): (r["both_decided"], r["agree"], r["rate"]) for r in agreement(rows)}
    assert got == {("mc", "judge"): (2, 1, 0.5), ("mc", "check"): (2, 1, 0.5), ("judge", "check"): (1, 0, 0.0)}


@pytest.mark.parametrize("rule", RULES)
def test_every_export_with_every_rule_loads_with_datasets(rule, tmp_path):
    from datasets import load_dataset

    store = open_store(str(tmp_path / "data"))
    for fmt in ("trl-prm", "math-shepherd", "prm800k", "step-dpo", "trl-dpo"):
        out = tmp_path / "out" / fmt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SoftLabelWarning)
            record = run_export(store, "demo", 1, fmt, str(out), {"consensus": rule}, data=_data())
        assert json.loads((out / "export.json").read_text())["stats"]["consensus"]["rule"] == rule
        ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
        # (datasets cannot load a file with no rows at all, so the data give every rule something to keep)
        assert ds.column_names == [c["name"] for c in record["columns"]] and len(ds) == record["rows"] > 0
        assert record["options"]["consensus"] == rule


def test_consensus_summary_for_the_build_report():
    from storage.exports.labels import consensus_summary

    summary = consensus_summary(_steps())
    assert summary["solutions"] == 5
    agree = {(a["a"], a["b"]): (a["both_decided"], a["agree"]) for a in summary["agreement"]}
    # mc: s1 -1, s2 0, s3 1, s4 -1, s5 0; judge: -1, 0, 0, None, 0; check: -1, 1, 0, -1, 0; lean: -1, 0, 0, None, 0
    assert agree == {("mc", "judge"): (4, 3), ("mc", "check"): (5, 3), ("judge", "check"): (4, 3),
                     ("mc", "lean"): (4, 3), ("judge", "lean"): (4, 4), ("check", "lean"): (4, 3)}
    assert summary["kept_share"] == {"none": 1.0, "mc-and-judge": 0.6, "mc-and-check": 0.6, "mc-and-formal": 0.6,
                                     "majority": 1.0}
    # A release without Lean verdicts has no `mc-and-formal` share (it would only say "nothing kept").
    no_lean = _steps().set_column(_steps().column_names.index("verdicts"), "verdicts",
                                  pa.array([[v for v in vs if v["verifier"] != "lean"] for vs in
                                            _steps()["verdicts"].to_pylist()], pa.list_(VERDICT)))
    assert "mc-and-formal" not in consensus_summary(no_lean)["kept_share"]
    assert consensus_summary(_steps(with_verdicts=False)) == {}


def _verdict_opinions_by_row(steps: pa.Table) -> dict:
    """`verdict_opinions` as it was, a Python dict per verdict (4d1e441): the oracle of the column-wise one."""
    from storage.consensus import CHECK, STEP_CHECKS, _merge_checks

    if "verdicts" not in steps.column_names or steps.num_rows == 0:
        return {}
    cols = steps.select(["solution_id", "step_index", "verdicts"]).to_pydict()
    per: dict = {}
    for sid, idx, verdicts in zip(cols["solution_id"], cols["step_index"], cols["verdicts"]):
        by_verifier = per.setdefault(sid, {}).setdefault(idx, {})
        for v in verdicts or ():
            by_verifier[v["verifier"]] = v["status"]
    out: dict = {}
    for sid, by_step in per.items():
        order = sorted(by_step)
        names = {name for step in by_step.values() for name in step}
        ops: dict = {}
        for name in sorted(names - set(STEP_CHECKS)):
            ops[name] = first_error_opinion([by_step[i].get(name) for i in order])
        if names & set(STEP_CHECKS):
            merged = []
            for i in order:
                got = [by_step[i][c] for c in STEP_CHECKS if c in by_step[i]]
                merged.append(_merge_checks(got) if got else None)
            ops[CHECK] = first_error_opinion(merged)
        out[sid] = ops
    return out


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _assert_opinions_as_by_row(rows, names) -> None:
    """`verdict_opinions` of (solution_id, step_index, [(verifier, status)] | None) rows is the by-row reference,
    keys in the same order, and each verifier's column as arrays (`verifier_opinions`) says the same."""
    steps = pa.table({"solution_id": pa.array([r[0] for r in rows], pa.string()),
                      "step_index": pa.array([r[1] for r in rows], pa.int32()),
                      "verdicts": pa.array([None if r[2] is None else [_v(n, s) for n, s in r[2]] for r in rows],
                                           pa.list_(VERDICT))})
    got, want = verdict_opinions(steps), _verdict_opinions_by_row(steps)
    assert got == want
    assert [list(ops) for ops in got.values()] == [list(ops) for ops in want.values()]
    for name in names:
        sids, has, opinions = verifier_opinions(steps, name)
        assert {sid: None if o == NO_OPINION else o for sid, h, o in zip(sids, has, opinions.tolist()) if h} == \
            {sid: ops[name] for sid, ops in want.items() if name in ops}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", None]), st.integers(0, 4),
                               st.one_of(st.none(), st.lists(st.tuples(
                                   st.sampled_from(["judge", "lean", "arith-check", "code-check", "check", "zz"]),
                                   st.sampled_from(["valid", "invalid", "none", "error", "timeout", "odd", None])),
                                   max_size=3))), max_size=14))
def test_verdict_opinions_column_wise_match_by_row(rows):
    """Any order, repeated steps (merged, later verdicts win), gaps in step_index, null or unknown statuses, a
    verifier named `check` beside the step checks: the same opinions, with keys in the same order."""
    _assert_opinions_as_by_row(rows, ("judge", "lean", "check", "arith-check", "zz"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", "s0"]), st.integers(0, 4),
                               st.one_of(st.none(), st.lists(st.tuples(
                                   st.sampled_from(["judge", "lean", "arith-check", "code-check", "check", "zz"]),
                                   st.sampled_from(["valid", "invalid", "none", "error", "timeout", "odd", None])),
                                   max_size=3))), max_size=14),
       how=st.sampled_from(["in order", "again later", "steps reversed"]))
def test_verdict_opinions_of_rows_in_solution_order(rows, how):
    """Rows as a stream of whole solutions has them (each solution one run, its steps in order: the path that
    skips the sort), or not quite (a solution coming back later, a run's steps out of order: the sorting
    path): the by-row opinions."""
    rows = sorted(rows, key=lambda r: (r[0], -r[1] if how == "steps reversed" else r[1]))
    if how == "again later" and rows:
        rows = rows + [rows[0]]  # its solution again after the others
    _assert_opinions_as_by_row(rows, ("judge", "check", "zz"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", None]), st.integers(0, 3),
                               st.one_of(st.none(), st.lists(st.tuples(
                                   st.sampled_from(["judge", "lean", "arith-check", "code-check", "check", "mc", "zz"]),
                                   st.sampled_from(["valid", "invalid", "none", "error", None])), max_size=3))), max_size=12),
       order=st.permutations(["s1", "s2", "s3", None, "s1"]), mc=st.lists(st.sampled_from([None, -1, 0, 1, 2]), min_size=5, max_size=5))
def test_majority_column_wise_is_decide(rows, order, mc):
    """`majority_arrays` against `decide("majority", ...)` per solution: verifiers named `mc` and `check` beside
    MC's own opinion and the merged step checks, ids without verdicts, one id asked for twice."""
    from storage.consensus import majority_arrays

    steps = pa.table({"solution_id": pa.array([r[0] for r in rows], pa.string()),
                      "step_index": pa.array([r[1] for r in rows], pa.int32()),
                      "verdicts": pa.array([None if r[2] is None else [_v(n, s) for n, s in r[2]] for r in rows],
                                           pa.list_(VERDICT))})
    opinions = verdict_opinions(steps)
    want = [decide("majority", {**opinions.get(sid, {}), "mc": m}) for sid, m in zip(order, mc)]
    keep, agreed, enough = majority_arrays(steps, pa.array(order, pa.string()),
                                           np.array([NO_OPINION if m is None else m for m in mc], np.int64))
    assert keep.tolist() == [d.keep for d in want]
    assert [None if a == NO_OPINION else a for a in agreed.tolist()] == [d.first_error for d in want]
    assert [d.reason != "too few opinions" for d in want] == enough.tolist()
