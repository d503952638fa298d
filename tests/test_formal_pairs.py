"""Lean-verified step-DPO pairs (`pairs.formal`, kind `formal`): sibling steps from one prefix, the one on
which Lean's whole-proof check puts the first error against one that continues to a proof Lean verifies.
Checked against the synthetic oracle in both domains (tactic steps of `synthetic-lean`, and the synthetic
problems' written steps formalised by the simulated prover), with every search algorithm that leaves
first errors, on the stand-in REPL (not Lean)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from flows.components import load_source, make_formal_labeller, make_policy, make_verifier
from flows.config import load_config
from storage.errors import ConfigError
from storage.render import StepFormat, segment
from tasks.search.engine import Engine
from tasks.shard import run_shard
from tasks.sources.synthetic import first_error, parse_question
from tests.test_formal_search import oracle_first_error

CMD = "[" + ", ".join([sys.executable, "-m", "verifiers.lean.testing.repl_server"]) + "]"


def _shard(domain: str, algorithm: str):
    sets = ["source.num_problems=10", "source.seed=6", "policy.step_error_rate=0.3", "formal.enabled=true",
            f"formal.lean.command={CMD}", f"search.algorithm={algorithm}", "pairs.formal.enabled=true",
            "judge.enabled=false"]
    if domain == "lean":
        sets += ["source.kind=synthetic-lean", "policy.kind=simulated-prover", "verifier.kind=lean",
                 f"verifier.lean.command={CMD}", "checks=[]"]
    cfg = load_config(None, sets)

    async def go():
        problems = load_source(cfg).problems
        policy, verifier = make_policy(cfg), make_verifier(cfg)
        engine = Engine(policy, verifier, cfg.prompt, seed=cfg.seed)
        try:
            return problems, await run_shard(problems, engine, cfg.search, budget=cfg.budget, pairs=cfg.pairs,
                                             formal=make_formal_labeller(cfg))
        finally:
            await verifier.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("domain,algorithm", [("lean", "math-shepherd"), ("lean", "omegaprm"),
                                              ("math", "math-shepherd"), ("math", "mcts")])
def test_formal_pairs_reject_lean_first_errors_and_choose_verified_proofs(domain, algorithm):
    problems, res = _shard(domain, algorithm)
    by_id = {p.problem_id: p for p in problems}
    fmt = StepFormat()
    pairs = [r for r in res.tables["pairs"].to_pylist() if r["kind"] == "formal"]
    assert pairs and res.stats.pairs_by_kind["formal"] == len(pairs)
    for r in pairs:
        problem, prefix = by_id[r["problem_id"]], list(r["prefix_steps"])
        chosen = [s.text for s in segment(r["full_chosen"], fmt)]
        assert chosen[0] == r["chosen"] != r["rejected"]
        assert (r["chosen_value"], r["rejected_value"], r["margin"]) == (1.0, 0.0, 1.0)
        if domain == "lean":
            assert oracle_first_error(problem, prefix + [r["rejected"]]) == len(prefix)
            full = prefix + chosen
            assert oracle_first_error(problem, full) is None and full[-1].startswith("exact ")
        else:
            spec, _ = parse_question(problem.question)
            assert first_error(spec, prefix + [r["rejected"]]) == len(prefix)
            full = prefix + chosen
            assert first_error(spec, full) is None and len(full) == len(spec.ops)
    # One pair per (prefix, rejected step) with the default max_per_prefix.
    assert len({(r["problem_id"], tuple(r["prefix_steps"]), r["rejected"]) for r in pairs}) == len(pairs)


def test_formal_pairs_need_the_formal_section():
    with pytest.raises(ConfigError, match="`formal.enabled=true`") as exc:
        load_config(None, ["pairs.formal.enabled=true"])
    assert exc.value.field == "pairs.formal.enabled"


def test_candidates_skip_the_rejected_step_before_counting():
    from tasks.pairs.formal import candidates

    rejected = "have h₁ : 2 + 2 = 5 := by norm_num"
    rollouts = [[rejected, "exact h₁"]] * 3 + [[], ["have h₁ : 2 + 2 = 4 := by norm_num", "exact h₁"],
                                                 ["have h₁ : 4 = 2 + 2 := by norm_num", "exact h₁.symm"]]
    # Three rollouts repeat the rejected step: with a limit of 2 the two real siblings must still be checked.
    assert candidates(rollouts, rejected, 2) == rollouts[4:6]
    assert candidates(rollouts, rejected, 1) == rollouts[4:5]
    assert candidates(rollouts[:4], rejected, 8) == []
