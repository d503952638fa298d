"""The formal domain as a search domain: `source.kind=synthetic-lean` (the synthetic problems as Lean 4
theorems), `policy.kind=simulated-prover` (one tactic per step, the simulated policy's mistakes) and
`verifier.kind=lean` (each completed proof checked whole). Math-Shepherd MC, OmegaPRM and MCTS run over
tactic steps through the same engine; the Lean backends are the stand-ins (not Lean).

The oracle of a tactic proof: step i < n is right iff it is `have hᵢ₊₁ : <chain up to i + 1> = <the chain's
value>`, step n iff it is the closing `exact hₙ`."""

from __future__ import annotations

import asyncio
import sys
from fractions import Fraction

import pytest

from flows.components import load_source, make_formal_labeller, make_policy, make_verifier
from flows.config import BuildConfig, load_config
from storage.errors import ConfigError
from tasks.formal import chain_expr
from tasks.policy.simulated_prover import SimulatedProver, SimulatedProverConfig, have_value, parse_theorem
from tasks.search.engine import Engine
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic, parse_question
from tasks.sources.synthetic_lean import SyntheticLeanSourceConfig, load_synthetic_lean
from verifiers.lean.testing.kimina_server import KiminaStandin

STANDIN_REPL = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def oracle_first_error(problem, tactics: list[str]) -> int | None:
    spec, _ = parse_theorem(problem.question)
    truth = spec.value_chain
    for i, t in enumerate(tactics):
        if i < len(spec.ops):
            ok = t.startswith(f"have h{i + 1}".translate(_SUB) + f" : {chain_expr(spec, i + 1)} = ") and \
                have_value(t) == truth[i + 1]
        else:
            ok = i == len(spec.ops) and t == f"exact h{len(spec.ops)}".translate(_SUB)
        if not ok:
            return i
    return None


def _config(*sets: str, verifier: list[str] | None = None, formal: list[str] | None = None,
            policy: list[str] | None = None) -> BuildConfig:
    cmd = "[" + ", ".join(STANDIN_REPL) + "]"
    return load_config(None, ["source.kind=synthetic-lean", "source.num_problems=8", "source.seed=2",
                              *(policy or ["policy.kind=simulated-prover", "policy.step_error_rate=0.3"]),
                              "verifier.kind=lean",
                              *(verifier or [f"verifier.lean.command={cmd}"]), "judge.enabled=false", "checks=[]",
                              "formal.enabled=true", *(formal or [f"formal.lean.command={cmd}"]), *sets])


def _shard(cfg: BuildConfig):
    async def go():
        problems = load_source(cfg).problems
        policy, verifier = make_policy(cfg), make_verifier(cfg)
        engine = Engine(policy, verifier, cfg.prompt, seed=cfg.seed)
        try:
            res = await run_shard(problems, engine, cfg.search, budget=cfg.budget, pairs=cfg.pairs,
                                  formal=make_formal_labeller(cfg))
        finally:
            await verifier.aclose()
        return problems, res

    return asyncio.run(go())


def _by_solution(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["solution_id"], []).append(row)
    return {k: sorted(v, key=lambda r: r["step_index"]) for k, v in out.items()}


def test_the_formal_source_is_the_synthetic_problems_as_theorems():
    informal = load_synthetic(SyntheticSourceConfig(num_problems=5, seed=3)).problems
    formal = load_synthetic_lean(SyntheticLeanSourceConfig(num_problems=5, seed=3)).problems
    for p, f in zip(informal, formal):
        spec, _ = parse_question(p.question)
        assert f.domain == "lean" and f.header == "import Mathlib" and f.formal_statement == f.question
        assert f.question.endswith(f"= {spec.answer} := by") and f.metadata["informal"] == p.question
        assert parse_theorem(f.question)[0].ops == spec.ops  # the prover reads the chain back from Lean
        assert oracle_first_error(f, f.metadata["reference_steps"]) is None


def test_the_prover_writes_the_reference_proof_without_mistakes_and_continues_any_prefix():
    problem = load_synthetic_lean(SyntheticLeanSourceConfig(num_problems=1, seed=1)).problems[0]
    ref = problem.metadata["reference_steps"]
    clean = SimulatedProver(SimulatedProverConfig(step_error_rate=0.0))
    from storage.render import StepFormat

    fmt = StepFormat()
    for done in range(len(ref)):
        prompt = f"Question: {problem.question}\nAnswer:\n" + fmt.render(ref[:done])
        (out,) = clean.sample_n(prompt, 7, 1)
        assert [l.split(": ", 1)[1] for l in out.text.split("\n")] == ref[done:], done
        assert not out.text.endswith("\n")  # the closing tactic ends the proof: end of sequence
        (one,) = clean.sample_n(prompt, 7, 1, stop=fmt.stop)
        assert one.text == f"Step {done + 1}: {ref[done]}" and (one.stop_reason is None) == (done == len(ref) - 1)
    assert have_value("have h₂ : (5 : ℚ) / 2 = ((-7) / 2) := by norm_num") == Fraction(-7, 2)
    assert have_value("have h₂ : (5 : ℚ) - 9 = (-4) := by norm_num") == -4 and have_value("exact h₂") is None
    # Mistakes, deterministic per (seed, prompt, sample).
    noisy = SimulatedProver(SimulatedProverConfig(step_error_rate=0.6))
    prompt = f"Question: {problem.question}\nAnswer:\n"
    outs = noisy.sample_n(prompt, 3, 12)
    assert [o.text for o in outs] == [o.text for o in noisy.sample_n(prompt, 3, 12)]
    assert any(oracle_first_error(problem, [l.split(": ", 1)[1] for l in o.text.split("\n")]) is not None for o in outs)


@pytest.mark.parametrize("algorithm", ["math-shepherd", "omegaprm", "mcts"])
def test_search_over_tactic_steps_labels_like_the_oracle(algorithm):
    sets = [f"search.algorithm={algorithm}"]
    if algorithm == "math-shepherd":
        sets += ["search.k=6", "search.num_solutions=3"]
    problems, res = _shard(_config(*sets))
    by_id = {p.problem_id: p for p in problems}
    solutions = _by_solution(res.tables["steps"])
    wrong = 0
    for rows in solutions.values():
        problem = by_id[rows[0]["problem_id"]]
        tactics = [r["step_text"] for r in rows]
        fe = oracle_first_error(problem, tactics)
        n = len(rows)
        # Lean's whole-proof check puts the first error on the oracle's step.
        assert [r["formal_label"] for r in rows] == ([True] * n if fe is None else [True] * fe + [False] + [None] * (n - fe - 1))
        if fe is not None:
            wrong += 1
            # No completed proof through a wrong tactic is valid: MC from Lean-checked rollouts is 0 there.
            assert all(r["mc_c"] == 0 for r in rows[fe:] if r["mc_k"])
    assert solutions and (wrong > 0 or algorithm == "mcts")
    nodes = res.tables["nodes"].to_pylist()
    assert any(v["verifier"] == "lean-repl" for n in nodes for v in n["verdicts"]), "rollouts were judged by Lean"
    assert res.stats.verifications > len(solutions)


def test_formal_mc_is_the_same_over_http_and_in_process():
    sets = ("search.k=4", "search.num_solutions=2", "source.num_problems=5", "pairs.formal.enabled=true")
    _, by_repl = _shard(_config(*sets))
    with KiminaStandin() as srv:
        _, by_http = _shard(_config(*sets, formal=["formal.lean.kind=kimina", f"formal.lean.base_url={srv.url}"],
                                    verifier=["verifier.lean.kind=kimina", f"verifier.lean.base_url={srv.url}"]))
    cols = ["problem_id", "solution_id", "step_index", "step_text", "mc_k", "mc_c", "formal_label"]
    assert by_repl.tables["steps"].select(cols).to_pylist() == by_http.tables["steps"].select(cols).to_pylist()
    assert by_repl.tables["pairs"].to_pylist() == by_http.tables["pairs"].to_pylist()
    assert by_http.stats.pairs_by_kind.get("formal", 0) > 0  # Lean-verified pairs, the same over HTTP


def test_domain_mismatches_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="`verifier.kind=lean`"):
        load_config(None, ["source.kind=synthetic-lean", "policy.kind=simulated-prover"])
    with pytest.raises(ConfigError, match="`policy.kind=simulated-prover`"):
        load_config(None, ["source.kind=synthetic-lean", "verifier.kind=lean"])
    with pytest.raises(ConfigError, match="cannot check"):
        load_config(None, ["verifier.kind=lean"])
    # The simulated judge reads the arithmetic domain's solutions, not Lean tactics.
    lean = ["source.kind=synthetic-lean", "policy.kind=simulated-prover", "verifier.kind=lean"]
    with pytest.raises(ConfigError, match="`judge.enabled=false`") as exc:
        load_config(None, lean)
    assert exc.value.field == "judge.policy.kind"
    assert load_config(None, [*lean, "judge.enabled=false"]).judge.enabled is False
    # Pool limits of the outcome verifier's Lean backend are not content.
    a = _config("verifier.lean.max_repls=1")
    assert a.build_key() == _config("verifier.lean.max_repls=3").build_key() != _config("verifier.lean.timeout_s=5").build_key()


def test_preflight_names_a_lean_command_that_cannot_start():
    from flows.components import verify

    verify(_config())  # the stand-in's command (this interpreter) is found
    for sets in (["verifier.lean.command=[no-such-lean-repl]"], ["formal.lean.command=[/no/such/repl]"]):
        with pytest.raises(ConfigError, match="cannot find") as exc:
            verify(_config(*sets))
        assert exc.value.field == sets[0].split("=")[0]
    with pytest.raises(ConfigError, match="not set or empty") as exc:
        verify(_config(formal=["formal.lean.kind=kimina", "formal.lean.api_key_env=STEPFORGE_TEST_NO_SUCH_KEY"]))
    assert exc.value.field == "formal.lean.api_key_env"
    # Errors inside a Lean backend name the field as typed, without the union's tag.
    with pytest.raises(ConfigError) as exc:
        _config(formal=["formal.lean.kind=kimina", "formal.lean.batch_size=0"])
    assert exc.value.field == "formal.lean.batch_size"
    with pytest.raises(ConfigError) as exc:
        _config("verifier.lean.timeout_s=-1")
    assert exc.value.field == "verifier.lean.timeout_s"


def test_the_prover_over_the_stand_in_openai_server_searches_like_in_process():
    """The formal domain through the OpenAI backend: the stand-in server serves the simulated prover under
    `--prover-model`, sample by sample; the tactic steps, MC over Lean-checked completions and formal labels
    are those of the in-process prover."""
    from tasks.testing.standin_server import StandinServer, StandinServerConfig

    sets = ("search.k=4", "search.num_solutions=2", "source.num_problems=5")
    _, in_process = _shard(_config(*sets))
    with StandinServer(StandinServerConfig(prover_model="sim-prover", step_error_rate=0.3)) as srv:
        _, over_http = _shard(_config(*sets, policy=["policy.kind=openai", f"policy.base_url={srv.base_url}",
                                                     "policy.model=sim-prover", "policy.api_key_env=null"]))
        assert srv.stats.samples > 0
    cols = ["problem_id", "step_index", "step_text", "mc_k", "mc_c", "formal_label", "first_error_index"]
    assert in_process.tables["steps"].select(cols).to_pylist() == over_http.tables["steps"].select(cols).to_pylist()
    assert any(r is False for r in over_http.tables["steps"].column("formal_label").to_pylist())
