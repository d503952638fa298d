"""Majority-vote pseudo-gold for problems without a gold answer: the vote itself, and against the synthetic
oracle (the voted reference is the true answer wherever one is given)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig
from tasks.pseudo_gold import PseudoGoldConfig, canonical_answer, pseudo_gold, vote, with_reference
from tasks.search.engine import Engine
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig


@pytest.mark.parametrize("text,answer", [
    ("Step 1: 3 + 4 = 7. The answer is 7.", "7"),
    ("so she pays $18.00 in total.\n#### 18", "18"),
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("#### 1,250", "1250"),
    ("half of it: 0.5", "1/2"),
    ("I do not know.", None),
])
def test_canonical_answers_make_equal_answers_one_vote(text, answer):
    assert canonical_answer(text) == answer


def test_vote_takes_the_plurality_above_the_floor_and_refuses_ties():
    texts = ["The answer is 18."] * 3 + ["The answer is 18.0"] + ["The answer is 20."] * 2 + ["no idea"] * 2
    v = vote(texts, 0.25)
    assert (v.answer, v.votes, v.samples, v.share) == ("18", 4, 8, 0.5) and v.counts == {"18": 4, "20": 2}
    assert vote(texts, 0.6).answer is None, "4 of 8 is below a 0.6 floor"
    assert vote(["The answer is 1.", "The answer is 2."], 0.25).answer is None, "a tie is no reference"
    assert vote(["nothing here"], 0.25).answer is None


def test_pseudo_gold_finds_the_true_answer_on_the_synthetic_domain():
    problems = load_synthetic(SyntheticSourceConfig(num_problems=40, seed=3)).problems
    prompt = PromptConfig()

    async def go():
        eng = Engine(SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.1), prompt.step_format),
                     OutcomeVerifier(OutcomeVerifierConfig()), prompt, seed=0)
        try:
            stripped = [dataclasses.replace(p, answer=None) for p in problems]
            return await asyncio.gather(*(pseudo_gold(eng, p, PseudoGoldConfig()) for p in stripped))
        finally:
            await eng.verifier.aclose()

    votes = asyncio.run(go())
    # Measured (seed 0): 39 of 40 voted the true answer, 1 had no answer with a 25 % share, none voted wrong.
    assert sum(v.answer == p.answer for v, p in zip(votes, problems)) >= 36
    assert all(v.answer in (None, p.answer) for v, p in zip(votes, problems))
    marked = with_reference(dataclasses.replace(problems[0], answer=None), votes[0])
    assert marked.answer == votes[0].answer and marked.metadata["pseudo_gold"]["samples"] == 16
    assert marked.problem_id == problems[0].problem_id, "the reference is not part of the problem's identity"
