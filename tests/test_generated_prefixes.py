"""Prefixes sent back to the policy are byte for byte what it wrote, in every step format: stored steps may
drop a label or a blank, the prompts never do. Tested with a policy that refuses any prompt whose steps are
not exactly in its own writing (label, punctuation, blanks, separators)."""

from __future__ import annotations

import asyncio

import pytest

from storage.render import StepFormat, segment
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig
from tasks.search.engine import Engine
from tasks.search.math_shepherd import MathShepherdConfig
from tasks.search.mcts import MCTSConfig
from tasks.search.omegaprm import OmegaPRMConfig
from tasks.shard import run_shard
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig


class DotLabels(StepFormat):
    """Writes `Step 1. text \\n`: another label punctuation and a blank before the separator."""

    def render_step(self, index: int, text: str) -> str:
        return f"Step {index + 1}. {text} {self.separator}"


class OwnHeads(StepFormat):
    """Writes its own `Step 1: ` heads although the build's format has no label."""

    def render_step(self, index: int, text: str) -> str:
        return f"Step {index + 1}: {text}{self.separator}"


class MixedSeparators(StepFormat):
    """`Step i:` labels with a separator that varies between steps (`\\n`, then ` \\n`, ...)."""

    def render_step(self, index: int, text: str) -> str:
        return f"Step {index + 1}: {text}{' ' if index % 2 else ''}{self.separator}"


class OwnFormatPolicy(SimulatedPolicy):
    """The simulated policy, made to understand only its own writing: a prompt whose steps are not exactly
    what it writes for them is refused, as a model would be thrown off by text it never produces."""

    def __init__(self, writes: StepFormat) -> None:
        super().__init__(SimulatedPolicyConfig(step_error_rate=0.3), writes)
        self.prompts_read = 0

    def _context(self, prompt: str):
        head, _, written = prompt.partition("\nAnswer:\n")
        texts = [s.text for s in segment(written, self.step_format)]
        if self.step_format.render(texts) != written:
            raise ValueError(f"not my writing: {written!r} (I write {self.step_format.render(texts)!r})")
        self.prompts_read += 1
        return super()._context(prompt)


FORMATS = {
    # (the build's step format, the policy's own writing)
    "separator, labels": (StepFormat(), DotLabels()),
    "separator, no label": (StepFormat(label=None), OwnHeads(label=None)),
    "step-label": (StepFormat(mode="step-label"), MixedSeparators(mode="step-label")),
}
SEARCHES = {
    "math-shepherd": MathShepherdConfig(num_solutions=3, k=4),
    "omegaprm": OmegaPRMConfig(k=4, num_searches=4, rollout_budget=64),
    "mcts": MCTSConfig(children=3, iterations=6, k=2),
}


def _shard(fmt: StepFormat, policy: SimulatedPolicy, search):
    problems = load_synthetic(SyntheticSourceConfig(num_problems=4, seed=3, min_steps=3, max_steps=5)).problems
    prompt = PromptConfig(step_format=fmt)

    async def go():
        engine = Engine(policy, OutcomeVerifier(OutcomeVerifierConfig(use_math_verify=False)), prompt, seed=0)
        try:
            return await run_shard(problems, engine, search)
        finally:
            await engine.verifier.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("search", SEARCHES, ids=list(SEARCHES))
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
def test_the_policy_reads_back_exactly_what_it_wrote(fmt, search):
    build_fmt, writes = FORMATS[fmt]
    policy = OwnFormatPolicy(writes)
    result = _shard(build_fmt, policy, SEARCHES[search])
    steps = result.tables["steps"].to_pylist()
    assert policy.prompts_read > 10 and steps, "prompts with steps were read (none refused)"
    assert max(r["step_index"] for r in steps) >= 2, "prefixes several steps deep"
    # Stored steps are the step texts alone: the policy's labels and blanks are not data.
    assert all(not r["step_text"].startswith("Step") and r["step_text"] == r["step_text"].strip() for r in steps)

