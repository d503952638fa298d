"""Adaptive Monte Carlo (`search.adaptive`): rollouts in chunks that stop at the first correct one, up to N.
Fewer rollouts, hard labels as good against the oracle, deterministic, and served from the rollout cache."""

from __future__ import annotations

import asyncio

import pyarrow as pa

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig
from tasks.search.engine import Engine
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.rollout_cache import RolloutCache
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=16, seed=5)).problems
N, CHUNK = 16, 4


def _run(cfg: MathShepherdConfig, cache: RolloutCache | None = None):
    prompt = PromptConfig()

    async def go():
        eng = Engine(SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.1), prompt.step_format),
                     OutcomeVerifier(OutcomeVerifierConfig()), prompt, seed=0, cache=cache)
        try:
            return await run_shard(PROBLEMS, eng, cfg), eng
        finally:
            await eng.verifier.aclose()

    return asyncio.run(go())


def _first_error_hits(steps: pa.Table) -> tuple[int, int]:
    specs = {p.problem_id: parse_question(p.question)[0] for p in PROBLEMS}
    sols: dict[str, list[dict]] = {}
    for r in steps.to_pylist():
        sols.setdefault(r["solution_id"], []).append(r)
    hits = 0
    for rows in sols.values():
        rows.sort(key=lambda r: r["step_index"])
        hits += first_error(specs[rows[0]["problem_id"]], [r["step_text"] for r in rows]) == rows[0]["first_error_index"]
    return hits, len(sols)


def test_adaptive_stops_at_the_first_correct_chunk_and_labels_as_well():
    full, full_eng = _run(MathShepherdConfig(k=N))
    adaptive, ad_eng = _run(MathShepherdConfig(k=N, adaptive=True, adaptive_chunk=CHUNK))
    assert ad_eng.stats.samples < full_eng.stats.samples
    # Every estimated prefix: a success ends sampling in the chunk where it came, a prefix with none gets all N.
    for node in adaptive.tables["nodes"].to_pylist():
        if node["parent_id"] is None or node["is_terminal"]:
            continue  # the question's probe (full N) and finished solutions (their own outcome check)
        k, c = node["rollouts"], node["rollouts_correct"]
        assert (c == 0 and k == N) or (c > 0 and k <= N and k % CHUNK == 0), node
    # The same solutions (same seeds for them), hard labels as right against the oracle.
    assert adaptive.tables["steps"].column("step_text") == full.tables["steps"].column("step_text")
    hits_full, n = _first_error_hits(full.tables["steps"])
    hits_adaptive, _ = _first_error_hits(adaptive.tables["steps"])
    assert n >= 30 and hits_adaptive >= hits_full - 1, (hits_adaptive, hits_full, n)


def test_adaptive_is_deterministic_and_cached(tmp_path):
    cfg = MathShepherdConfig(k=N, adaptive=True, adaptive_chunk=CHUNK)
    cache = RolloutCache(tmp_path / "rollouts.sqlite")
    first, first_eng = _run(cfg, cache)
    again, again_eng = _run(cfg, RolloutCache(tmp_path / "rollouts.sqlite"))
    for name in ("nodes", "steps", "pairs"):
        assert first.tables[name].equals(again.tables[name]), name
    assert first_eng.stats.cache_hits == 0 and again_eng.stats.policy_requests == 0
    assert again_eng.stats.cache_hits == first_eng.stats.policy_requests


def test_soft_values_of_an_adaptive_release_come_with_a_warning():
    import warnings

    from storage.exports import EXPORTERS, parse_options
    from storage.exports.base import ReleaseData, SoftLabelWarning

    res, _ = _run(MathShepherdConfig(k=N, adaptive=True, adaptive_chunk=CHUNK))
    manifest = {"dataset": "x", "version": 1, "config": {"search": {"algorithm": "math-shepherd", "adaptive": True}}}
    data = ReleaseData(manifest, dict(res.tables))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoftLabelWarning)
        soft = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"labels": "soft"}))
    assert any("search.adaptive" in w for w in soft.warnings)
    assert any("search.adaptive" in w for w in EXPORTERS["prm800k"].fn(data, parse_options("prm800k")).warnings)
    assert not EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm")).warnings  # hard labels are unaffected
