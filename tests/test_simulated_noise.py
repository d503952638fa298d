"""Recovery and lucky answers in the simulated policy: off by default (the clean policy is unchanged), exact
against the oracle when on, served the same over HTTP, and the reason Monte Carlo labels disagree with the
oracle."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest

from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.testing.standin_server import StandinServer, StandinServerConfig
from tasks.prompt import PromptConfig, render_prompt
from tasks.search.math_shepherd import MathShepherdConfig
from storage.render import StepFormat, segment
from tasks.shard import run_shard
from tasks.sources.synthetic import (ArithSpec, SyntheticSourceConfig, first_error, load_synthetic, masked_error,
                                     parse_question, render_step)

NOISY = dict(step_error_rate=0.3, recovery_rate=0.5, lucky_rate=0.3)
SPEC = ArithSpec("Ava", "apples", 12, (("+", 5), ("*", 3), ("-", 7)))


def _samples(cfg: SimulatedPolicyConfig, problems, n: int = 8) -> list[list[str]]:
    pol = SimulatedPolicy(cfg)
    out = []
    for p in problems:
        prompt = render_prompt(PromptConfig(), p.question, [])
        out += [[s.text for s in segment(c.text, StepFormat())] for c in pol.sample_n(prompt, 5, n)]
    return out


def test_noise_is_off_by_default_and_zero_rates_change_nothing():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=30, seed=4)).problems
    default = SimulatedPolicyConfig(step_error_rate=0.3)
    assert default.recovery_rate == 0.0 and default.lucky_rate == 0.0
    explicit = SimulatedPolicyConfig(step_error_rate=0.3, recovery_rate=0.0, lucky_rate=0.0)
    assert _samples(default, problems) == _samples(explicit, problems)
    # The identity (and so the rollout cache key) of a clean policy is what it was before noise existed.
    assert SimulatedPolicy(default).policy_id == "simulated-arith/v1/err=0.3"
    assert SimulatedPolicy(SimulatedPolicyConfig(**NOISY)).policy_id == "simulated-arith/v1/err=0.3/recover=0.5/lucky=0.3"


def test_masked_error_names_recovery_and_luck():
    good = SPEC.reference_steps()  # 12 + 5 = 17, 17 * 3 = 51, 51 - 7 = 44
    slip = render_step(SPEC, 0, Fraction(12), "+", Fraction(5), Fraction(18))
    assert masked_error(SPEC, good) is None
    assert masked_error(SPEC, [slip, good[1], good[2]]) == "recovered"  # step 1 is back on the chain
    lucky_last = render_step(SPEC, 2, Fraction(54), "-", Fraction(7), Fraction(44))  # 54 - 7 = 44: a slip onto gold
    assert masked_error(SPEC, [slip, render_step(SPEC, 1, Fraction(18), "*", Fraction(3), Fraction(54)), lucky_last]) == "lucky"
    wrong_end = render_step(SPEC, 2, Fraction(54), "-", Fraction(7), Fraction(47))
    assert masked_error(SPEC, [slip, render_step(SPEC, 1, Fraction(18), "*", Fraction(3), Fraction(54)), wrong_end]) is None


def test_noisy_policy_recovers_and_gets_lucky_while_the_oracle_stays_exact():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=40, seed=4)).problems
    specs = [parse_question(p.question)[0] for p in problems]
    clean = _samples(SimulatedPolicyConfig(step_error_rate=0.3), problems)
    noisy = _samples(SimulatedPolicyConfig(**NOISY), problems)
    kinds = {"recovered": 0, "lucky": 0, None: 0}
    for i, (c, n) in enumerate(zip(clean, noisy)):
        spec = specs[i // 8]
        assert masked_error(spec, c) is None, "the clean policy never ends on the gold answer after a mistake"
        kind = masked_error(spec, n)
        kinds[kind] += 1
        if kind is not None:
            fe = first_error(spec, n)
            # The oracle still finds the wrong step, and it is where the clean policy (same draws up to the
            # first noise event) went wrong too: noise changes what comes after a mistake, not the mistake.
            assert fe is not None and fe == first_error(spec, c)
    assert kinds["recovered"] >= 20 and kinds["lucky"] >= 5, kinds


def test_the_standin_server_serves_the_noisy_policy():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=8, seed=4)).problems
    reqs = [GenerationRequest(render_prompt(PromptConfig(), p.question, []), SamplingParams(n=4, seed=11 + i))
            for i, p in enumerate(problems)]
    want = asyncio.run(SimulatedPolicy(SimulatedPolicyConfig(**NOISY)).generate(reqs))
    with StandinServer(StandinServerConfig(model="simulated-arith", **NOISY)) as srv:
        pol = OpenAIPolicy(OpenAIPolicyConfig(base_url=srv.base_url, model="simulated-arith", api_key_env=None))

        async def go():
            try:
                return await pol.generate(reqs)
            finally:
                await pol.aclose()

        got = asyncio.run(go())
    assert [[c.text for c in outs] for outs in got] == [[c.text for c in outs] for outs in want]


def _mc_run(make_engine, cfg: SimulatedPolicyConfig, n_problems: int = 24):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n_problems, seed=4)).problems

    async def go():
        engine = make_engine(policy=SimulatedPolicy(cfg, PromptConfig().step_format))
        return await run_shard(problems, engine, MathShepherdConfig(k=8))

    res = asyncio.run(go())
    specs = {p.problem_id: parse_question(p.question)[0] for p in problems}
    sols: dict[str, list[dict]] = {}
    for r in res.tables["steps"].to_pylist():
        sols.setdefault(r["solution_id"], []).append(r)
    out = []
    for rows in sols.values():
        rows.sort(key=lambda r: r["step_index"])
        spec = specs[rows[0]["problem_id"]]
        steps = [r["step_text"] for r in rows]
        out.append((first_error(spec, steps), rows[0]["first_error_index"], masked_error(spec, steps)))
    return out


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
def test_mc_labels_disagree_with_the_oracle_where_recovery_or_luck_happened(noisy, make_engine):
    cfg = SimulatedPolicyConfig(**NOISY) if noisy else SimulatedPolicyConfig(step_error_rate=0.3)
    rows = _mc_run(make_engine, cfg)
    wrong = [(t, mc, kind) for t, mc, kind in rows if t is not None]
    assert len(wrong) >= 20
    # MC calls a wrong step good when some rollout from at or below it reached the answer: its first error
    # comes late or not at all.
    late = [(t, mc, kind) for t, mc, kind in wrong if mc is None or mc > t]
    if not noisy:
        # Clean domain: no rollout recovers after a mistake, so MC never puts the first error after the truth.
        assert late == []
        return
    masked = [(t, mc) for t, mc, kind in wrong if kind is not None]
    assert masked, "the sampled solutions include recovered or lucky ones"
    # A recovered or lucky solution reaches the gold answer itself, so MC sees no error at all.
    assert all(mc is None for _, mc in masked)
    # And rollouts recover too: MC misses errors on solutions that did not recover themselves.
    assert len(late) > len(masked)
