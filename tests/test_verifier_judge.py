"""The LLM-as-judge step verifier: parsing, votes, the simulated judge in-process and over the stand-in
HTTP server (identical verdicts), malformed output as `error`, and a judge server that dies."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from pydantic import ValidationError

from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.policy.simulated_judge import SimulatedJudge, SimulatedJudgeConfig
from tasks.testing.standin_server import StandinServer, StandinServerConfig
from tasks.prompt import load_template
from tasks.sources.synthetic import SyntheticSourceConfig, first_error, load_synthetic, parse_question
from verifiers.base import SolutionItem, Status, Verdict
from verifiers.judge import (JudgeBackendError, JudgeConfig, JudgeVerifier, judge_labels, majority,
                             parse_judgement, step_verdicts)

TEMPLATE = load_template("judge-first-error")


def request(prompt: str, n: int, temperature: float, max_tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed))


@pytest.mark.parametrize("text,n,expected", [
    ("The first wrong paragraph is 2.\n\n\\boxed{2}", 5, (2, "ok")),
    ("\\boxed{ -1 }", 5, (-1, "ok")),
    ("\\boxed{1} no wait \\boxed{3}", 5, (3, "ok")),  # the last box is the answer
    ("3", 5, (3, "ok")),
    ("\u22121", 5, (-1, "ok")),  # a typeset minus sign
    ("-1.", 5, (-1, "ok")),
    ("1.5", 5, (None, "no step index in the output")),
    ("Checked every paragraph.\nFinal answer: 4", 5, (4, "ok")),
    ("", 5, (None, "empty output")),
    ("   \n ", 5, (None, "empty output")),
    ("Let me think about paragraph 2 and paragraph 3 carefully.", 5, (None, "no step index in the output")),
    ("I'm sorry, but I can't help with that.", 5, (None, "refusal")),
    ("\\boxed{7}", 5, (None, "index 7 out of range for 5 steps")),
    ("\\boxed{-2}", 5, (None, "index -2 out of range for 5 steps")),
    ("\\boxed{paragraph two}", 5, (None, "\\boxed{paragraph two} is not a step index")),
])
def test_parse_judgement(text, n, expected):
    assert parse_judgement(text, n) == expected


def test_majority_and_ties():
    assert majority([2, 2, 3]) == (2, "2: 2, 3: 1")
    assert majority([2, 3])[0] is None and "tied" in majority([2, 3])[1]
    assert majority([None, None])[0] is None
    assert majority([None, -1]) == (-1, "-1: 1; 1 malformed")


def test_step_verdicts_and_labels():
    bad = Verdict("judge", "v", Status.INVALID, 2.0, "first error 2")
    assert [v.status for v in step_verdicts(bad, 4)] == [Status.VALID, Status.VALID, Status.INVALID, Status.NONE]
    assert judge_labels(bad, 4) == [True, True, False, None]
    good = Verdict("judge", "v", Status.VALID, -1.0, "first error -1")
    assert judge_labels(good, 3) == [True, True, True]
    err = Verdict("judge", "v", Status.ERROR, None, "votes none parsed")
    assert [v.status for v in step_verdicts(err, 2)] == [Status.ERROR, Status.ERROR]
    assert judge_labels(err, 2) == [None, None]


def test_votes_need_temperature():
    with pytest.raises(ValidationError, match="judge.temperature"):
        JudgeConfig(votes=3)
    assert JudgeConfig(votes=3, temperature=0.7).votes == 3


def _solutions(n: int = 60, error_rate: float = 0.3) -> list[SolutionItem]:
    problems = load_synthetic(SyntheticSourceConfig(num_problems=n, seed=11)).problems
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=error_rate))
    items = []
    for i, p in enumerate(problems):
        text = policy.sample(p.question + "\n", seed=i, index=0).text
        items.append(SolutionItem(p.question, tuple(s.split(": ", 1)[1] for s in text.strip().split("\n"))))
    return items


def _truth(item: SolutionItem) -> int:
    spec, _ = parse_question(item.question)
    fe = first_error(spec, list(item.steps))
    return -1 if fe is None else fe


def _verify(policy, items, **cfg) -> list[Verdict]:
    async def go():
        judge = JudgeVerifier(JudgeConfig(**cfg), policy, TEMPLATE, request, build_seed=7)
        try:
            return await judge.verify(items)
        finally:
            await judge.aclose()

    return asyncio.run(go())


def test_a_perfect_simulated_judge_finds_the_oracles_first_error():
    items = _solutions()
    verdicts = _verify(SimulatedJudge(SimulatedJudgeConfig(accuracy=1.0)), items)
    assert [int(v.score) for v in verdicts] == [_truth(it) for it in items]
    assert {v.status for v in verdicts} == {Status.VALID, Status.INVALID}, "both kinds of solution occur"
    assert all(v.verifier == "judge" and "simulated-judge" in v.version for v in verdicts)


def test_simulated_judge_errs_like_real_judges():
    items = _solutions(200, error_rate=0.25)
    verdicts = _verify(SimulatedJudge(SimulatedJudgeConfig(accuracy=0.7)), items)
    kinds = Counter()
    for item, v in zip(items, verdicts):
        truth, said = _truth(item), int(v.score)
        kinds["exact" if said == truth else "false alarm" if truth == -1 else "miss" if said == -1
              else "off by one" if abs(said - truth) == 1 else "other"] += 1
    assert 0.6 <= kinds["exact"] / len(items) <= 0.8, kinds
    assert kinds["false alarm"] and kinds["miss"] and kinds["off by one"], kinds
    assert kinds["other"] == 0, kinds


def test_malformed_judge_output_is_error_never_a_label():
    items = _solutions(20)
    verdicts = _verify(SimulatedJudge(SimulatedJudgeConfig(malformed_rate=1.0)), items)
    assert {v.status for v in verdicts} == {Status.ERROR}
    reasons = " ".join(v.detail for v in verdicts)
    for why in ("empty output", "refusal", "no step index", "out of range"):
        assert why in reasons
    assert all(label is None for v, it in zip(verdicts, items) for label in judge_labels(v, len(it.steps)))


def test_http_judge_gives_the_same_verdicts_as_in_process():
    items = _solutions(40)
    cfg = dict(votes=3, temperature=0.7)
    judge_cfg = SimulatedJudgeConfig(accuracy=0.6, malformed_rate=0.15)
    local = _verify(SimulatedJudge(judge_cfg), items, **cfg)
    with StandinServer(StandinServerConfig(judge_model="sim-judge", judge_accuracy=0.6,
                                           judge_malformed_rate=0.15)) as server:
        remote_policy = OpenAIPolicy(OpenAIPolicyConfig(base_url=[server.base_url], model="sim-judge",
                                                        api_key_env=None, timeout_s=5.0))
        remote = _verify(remote_policy, items, **cfg)
        assert server.stats.requests == len(items), "one request per solution, n = votes"
    assert [(v.status, v.score, v.detail) for v in remote] == [(v.status, v.score, v.detail) for v in local]
    assert {v.status for v in local} >= {Status.VALID, Status.INVALID, Status.ERROR}


def test_a_judge_server_that_dies_is_a_clear_failure_not_a_verdict():
    items = _solutions(30)
    with StandinServer(StandinServerConfig(judge_model="sim-judge", die_after=10)) as server:
        policy = OpenAIPolicy(OpenAIPolicyConfig(base_url=[server.base_url], model="sim-judge", api_key_env=None,
                                                 timeout_s=2.0, max_retries=1, backoff_initial_s=0.01,
                                                 connect_timeout_s=1.0))
        with pytest.raises(JudgeBackendError, match="judge backend .* failed.*rerun the build to resume"):
            _verify(policy, items)
