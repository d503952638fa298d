"""Reach-propagated hard labels at export, against the synthetic domain's oracle: the PRM exports label a step
by the solution's stored `first_error_index` by default (a rollout from the step or from a longer prefix below
it reached the answer), which at small N is far more accurate than each step's own `c > 0`."""

from __future__ import annotations

import asyncio

import pytest

from storage.errors import ConfigError
from storage.exports import EXPORTERS, parse_options
from storage.exports.base import ReleaseData
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question


@pytest.fixture(scope="module")
def release(make_engine):
    """32 problems at step error rate 0.3, Math-Shepherd with N = 4 rollouts per prefix (the issue's setting)."""
    problems = load_synthetic(SyntheticSourceConfig(num_problems=32, seed=0)).problems

    async def go():
        return await run_shard(problems, make_engine(0.3), MathShepherdConfig(k=4))

    res = asyncio.run(go())
    specs = {p.question: parse_question(p.question)[0] for p in problems}
    return ReleaseData({"dataset": "x", "version": 1}, dict(res.tables)), specs


def _f1(rows, specs):
    """ProcessBench F1 of the exported labels' first error (first step labelled bad) against the oracle."""
    err_hit = err_n = ok_hit = ok_n = 0
    for r in rows:
        truth = first_error(specs[r["prompt"]], r["completions"])
        pred = next((i for i, good in enumerate(r["labels"]) if not good), None)
        if truth is None:
            ok_n, ok_hit = ok_n + 1, ok_hit + (pred is None)
        else:
            err_n, err_hit = err_n + 1, err_hit + (pred == truth)
    a, b = err_hit / err_n, ok_hit / ok_n
    return 2 * a * b / (a + b)


def test_first_error_labels_beat_per_step_labels_against_the_oracle(release):
    data, specs = release
    default = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm"))
    per_step = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"step_labels": "per-step"}))
    assert default.stats["step_labels"] == "first-error" and per_step.stats["step_labels"] == "per-step"
    assert default.table.num_rows == per_step.table.num_rows > 100
    f1_first, f1_step = _f1(default.table.to_pylist(), specs), _f1(per_step.table.to_pylist(), specs)
    # Measured: 0.94 vs 0.58 (seed 0). A correct step whose own 4 rollouts all failed is still good when a
    # rollout from a later step of the solution reached the answer.
    assert f1_first >= 0.9 and f1_step <= 0.7, (f1_first, f1_step)
    # First-error labels are monotone (good, then bad); per-step ones need not be.
    assert all(lab == sorted(lab, reverse=True) for lab in default.table.column("labels").to_pylist())
    assert any(lab != sorted(lab, reverse=True) for lab in per_step.table.column("labels").to_pylist())


def test_every_prm_export_uses_the_same_labels(release):
    data, _ = release
    trl = {tuple(r["completions"]): r["labels"] for r in EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm")).table.to_pylist()}
    ms = EXPORTERS["math-shepherd"].fn(data, parse_options("math-shepherd")).table.to_pylist()
    prm = EXPORTERS["prm800k"].fn(data, parse_options("prm800k", {"stop_at_first_error": False})).table.to_pylist()
    assert len(ms) == len(prm) == len(trl)
    for row in ms:
        marks = [line[-1] == "+" for line in row["label"].split("\n")]
        steps = [line.split(": ", 1)[1][:-2] for line in row["label"].split("\n")]
        assert trl[tuple(steps)] == marks
    for row in prm:
        steps = row["label"]["steps"]
        texts = tuple(s["completions"][0]["text"] for s in steps)
        assert trl[texts] == [s["completions"][0]["rating"] != -1 for s in steps]


def test_first_error_takes_no_threshold():
    assert parse_options("trl-prm", {"threshold": 0.5}).step_labels is None  # unset: per-step at a threshold
    for fmt in ("trl-prm", "math-shepherd"):
        with pytest.raises(ConfigError, match="takes no threshold"):
            parse_options(fmt, {"threshold": 0.5, "step_labels": "first-error"})


@pytest.mark.parametrize("values,before,fallback,expected,why", [
    ([0.8, 0.7, 0.6, 1.0], 0.9, None, -1, "no step halves c/k, the end reaches the answer"),
    ([0.8, 0.3, 0.2, 1.0], 0.9, None, 1, "step 1 drops 0.8 -> 0.3: the first error even though the end recovered"),
    ([0.2, 0.2, 0.1, 0.0], 0.9, None, 0, "step 0 drops from the question's own c/k"),
    ([0.4, 0.4, 0.0], None, None, 2, "question's c/k unknown: step 0 is good when a rollout reached the answer"),
    ([0.0, 0.5], None, None, 0, "question's c/k unknown: step 0 is bad when none did"),
    ([0.0, 0.0, 0.0], 0.0, 1, 1, "never any c/k to drop from, a wrong end: the stored first error"),
    ([0.0, 0.0, 0.0], 0.0, None, None, "the same without a stored first error: undecided"),
    ([0.5, None, 1.0], 0.5, None, None, "a step without an estimate: undecided"),
])
def test_soft_drop_first_error(values, before, fallback, expected, why):
    from storage.exports.labels import soft_drop_first_error

    assert soft_drop_first_error(values, before, fallback) == expected, why


def test_soft_drop_labels_in_every_prm_export(release):
    data, _ = release
    trl = {tuple(r["completions"]): r["labels"] for r in EXPORTERS["trl-prm"].fn(
        data, parse_options("trl-prm", {"step_labels": "soft-drop"})).table.to_pylist()}
    default = {tuple(r["completions"]): r["labels"] for r in EXPORTERS["trl-prm"].fn(
        data, parse_options("trl-prm")).table.to_pylist()}
    assert trl.keys() == default.keys() and trl != default
    assert all(lab == sorted(lab, reverse=True) for lab in trl.values()), "good, then bad"
    ms = EXPORTERS["math-shepherd"].fn(data, parse_options("math-shepherd", {"step_labels": "soft-drop"}))
    assert ms.stats["step_labels"] == "soft-drop"
    for row in ms.table.to_pylist():
        marks = [line[-1] == "+" for line in row["label"].split("\n")]
        steps = [line.split(": ", 1)[1][:-2] for line in row["label"].split("\n")]
        assert trl[tuple(steps)] == marks
    with pytest.raises(ConfigError, match="takes no threshold"):
        EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"step_labels": "soft-drop", "threshold": 0.5}))
