"""The label-quality benchmark scores every algorithm on ONE fixed solution set (ProcessBench protocol),
so first-error accuracy is a prediction, never true by construction of the algorithm's own paths."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tasks.search.mcts import MCTSConfig
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "label_quality.py"


@pytest.fixture(scope="module")
def lq():
    spec = importlib.util.spec_from_file_location("label_quality_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fixed(lq):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=10, seed=2)).problems
    return asyncio.run(lq.sample_fixed_set(problems, 4, 0.3, 0))


def _preds(lq, fixed, method, setting):
    async def go():
        eng = lq.make_engine(0.3, 0)
        try:
            out = {}
            for p in fixed.problems:
                sols = fixed.solutions[p.problem_id]
                if method == "math-shepherd":
                    out[p.problem_id] = await lq.predict_math_shepherd(eng, p, sols, setting)
                elif method == "omegaprm":
                    out[p.problem_id] = await lq.predict_omegaprm(eng, p, sols, setting)
                else:
                    out[p.problem_id] = (await lq.predict_mcts(eng, p, sols, MCTSConfig(iterations=setting)))[0]
            return out, eng.stats
        finally:
            await eng.verifier.aclose()

    return asyncio.run(go())


def test_fixed_set_is_the_same_for_every_run_and_has_both_kinds(lq, fixed):
    again = asyncio.run(lq.sample_fixed_set(fixed.problems, 4, 0.3, 0))
    assert again.solutions == fixed.solutions, "same seed, same fixed solutions"
    truths = [t for ts in fixed.truth.values() for t in ts]
    assert any(t is None for t in truths) and any(t is not None for t in truths)
    # Full solutions: OmegaPRM is scored on steps after the error too, unlike its own truncated paths.
    assert all(len(s) == len(lq.parse_question(p.question)[0].ops) for p in fixed.problems
               for s in fixed.solutions[p.problem_id])


@pytest.mark.parametrize("method,setting", [("math-shepherd", 64), ("omegaprm", 64), ("mcts", 8)])
def test_every_method_predicts_on_the_fixed_set(lq, fixed, method, setting):
    preds, _ = _preds(lq, fixed, method, setting)
    assert {pid: len(v) for pid, v in preds.items()} == {pid: len(v) for pid, v in fixed.solutions.items()}
    hits = total = 0
    for pid, truth in fixed.truth.items():
        for t, p in zip(truth, preds[pid]):
            if t is None:
                assert p is None, "a right-answer solution is never given an error"
            else:
                total += 1
                hits += p == t
    assert hits / total >= 0.8, f"{method}: {hits}/{total} first errors located"


def test_omegaprm_accuracy_is_measured_not_given(lq, fixed):
    # With k = 1 a correct prefix often has MC = 0, so the binary search goes left of the true error: on
    # the fixed set this shows up as a miss (on OmegaPRM's own truncated paths it never could).
    preds, stats = _preds(lq, fixed, "omegaprm", 1)
    scored = lq.score_fixed(fixed, preds)
    assert scored["acc_err"] < 1.0
    assert 0 < scored["f1"] < 1.0
    _, ms_stats = _preds(lq, fixed, "math-shepherd", 1)
    assert stats.samples < ms_stats.samples, "binary search estimates fewer prefixes than every-prefix MC"


def test_score_fixed_is_processbench_f1(lq, fixed):
    exact = lq.score_fixed(fixed, fixed.truth)
    assert exact["f1"] == exact["acc_err"] == exact["acc_ok"] == exact["step_acc"] == 1.0
    never = lq.score_fixed(fixed, {pid: [None] * len(v) for pid, v in fixed.truth.items()})
    assert never["acc_ok"] == 1.0 and never["acc_err"] == 0.0 and never["f1"] == 0.0
    assert lq.f1_of(0.5, 1.0) == pytest.approx(2 / 3)


def test_consensus_keeps_solutions_whose_first_error_is_the_oracles(lq):
    """Part 3 at high noise (a third of the wrong solutions end on the gold answer): MC alone agrees with the
    oracle on under half the solutions; the consensus rules (storage/consensus.py, as the exports apply them)
    keep a subset that agrees far more often. Floors are measured values (24 problems, seed 2: mc-and-judge
    0.955 keeping 42 %, majority 0.825, mc-and-check 0.815, MC alone 0.472), rounded down."""
    # The judge and the step check are verifiers/judge.py and verifiers/arith_check.py (issue 12's other half):
    # skipped only on a tree that does not have them yet.
    pytest.importorskip("verifiers.judge")
    pytest.importorskip("verifiers.arith_check")
    problems = load_synthetic(SyntheticSourceConfig(num_problems=24, seed=2)).problems
    level = asyncio.run(lq.consensus_level(problems, 4, 4, 0.1, 0, lq.NOISE_LEVELS["high"], 0.8))
    r = level["results"]
    assert level["masked"] >= 5, "noise on: some wrong solutions end on the gold answer"
    assert r["mc-hard"]["kept_accuracy"] <= 0.55 and r["mc-hard"]["kept_share"] == 1.0
    assert r["mc-and-judge"]["kept_accuracy"] >= 0.93 and r["mc-and-judge"]["kept_share"] >= 0.35
    assert r["majority"]["kept_accuracy"] >= 0.8 and r["mc-and-check"]["kept_accuracy"] >= 0.78
    assert r["mc-and-judge"]["f1"] > max(r["mc-hard"]["f1"], r["judge"]["f1"])
    clean = asyncio.run(lq.consensus_level(problems, 4, 4, 0.1, 0, lq.NOISE_LEVELS["none"], 0.8))["results"]
    # Without noise MC is exact here, so whatever a rule keeps is right.
    assert clean["mc-hard"]["kept_accuracy"] == 1.0 and clean["mc-and-judge"]["kept_accuracy"] == 1.0
