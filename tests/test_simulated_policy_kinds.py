"""The simulated policy's mistakes come in all three kinds, its latency option holds requests without
breaking the concurrency limit, and the shard scheduler hands the policy few, large batches."""

from __future__ import annotations

import asyncio
from collections import Counter

import tasks.policy.simulated as simulated
import tasks.policy.simulated_base as simulated_base
from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig, render_prompt
from tasks.search.math_shepherd import MathShepherdConfig
from storage.render import StepFormat, segment
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question, parse_step

PROBLEMS = load_synthetic(SyntheticSourceConfig(num_problems=40, seed=4)).problems


def _error_kind(spec, index: int, text: str) -> str:
    """What the oracle's first wrong step did wrong, from the written step alone."""
    step = parse_step(text)
    op, x = spec.ops[index]
    if step.op != op:
        return "wrong_operation"
    if step.x != x:
        return "wrong_operand"
    return "wrong_result"


def test_all_three_mistake_kinds_occur_at_the_first_error():
    pol = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.3), StepFormat())
    kinds: Counter[str] = Counter()
    for p in PROBLEMS:
        spec, _ = parse_question(p.question)
        prompt = render_prompt(PromptConfig(), p.question, [])
        for i in range(4):
            steps = [s.text for s in segment(pol.sample(prompt, 0, i).text, StepFormat())]
            fe = first_error(spec, steps)
            if fe is not None and fe < len(spec.ops):
                assert parse_step(steps[fe]).a == spec.values[fe], "the first error starts from a right value"
                kinds[_error_kind(spec, fe, steps[fe])] += 1
    assert set(kinds) == set(simulated.ERROR_KINDS), kinds
    assert min(kinds.values()) >= 5, kinds


def test_latency_holds_each_request_within_the_concurrency_limit(monkeypatch):
    real_sleep = asyncio.sleep
    inside, peak, slept = 0, 0, []

    async def counting_sleep(seconds: float) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        slept.append(seconds)
        await real_sleep(0)
        inside -= 1

    monkeypatch.setattr(simulated_base.asyncio, "sleep", counting_sleep)
    pol = SimulatedPolicy(SimulatedPolicyConfig(latency_s=0.25, max_concurrency=3), StepFormat())
    prompt = render_prompt(PromptConfig(), PROBLEMS[0].question, [])
    requests = [GenerationRequest(prompt, SamplingParams(n=2, seed=i)) for i in range(10)]
    outs = asyncio.run(pol.generate(requests))
    assert [len(o) for o in outs] == [2] * 10
    assert slept == [0.25] * 10 and peak == 3, "every request waits L, never more than C at once"


def test_the_scheduler_gathers_every_tree_of_a_shard_into_few_batches(make_engine):
    class Counting(SimulatedPolicy):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[int] = []
            self.problems_per_call: list[int] = []

        async def generate(self, requests):
            self.calls.append(len(requests))
            self.problems_per_call.append(len({parse_question(r.prompt)[0].question() for r in requests}))
            return await super().generate(requests)

    prompt = PromptConfig()
    policy = Counting(SimulatedPolicyConfig(step_error_rate=0.3, max_batch=10_000), prompt.step_format)
    engine = make_engine(policy=policy)

    async def go():
        return await run_shard(PROBLEMS[:16], engine, MathShepherdConfig(num_solutions=4, k=8))

    result = asyncio.run(go())
    assert result.tables["steps"].num_rows > 0
    # Math-Shepherd is two rounds per problem (solutions, then every prefix's rollouts): each round of all
    # 16 trees goes to the policy together, never one tree at a time.
    assert len(policy.calls) <= 4, policy.calls
    assert policy.problems_per_call[0] == 16
    assert sum(policy.calls) == engine.stats.policy_requests
