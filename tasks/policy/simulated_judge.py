"""A simulated LLM judge for the synthetic arithmetic domain: a policy backend that answers first-error
prompts (`tasks/templates/judge-first-error.jinja`) the way real judges do, right most of the time.

It reads only the prompt text (the question, and the steps in `<paragraph_i>` tags), so it answers the same
in-process and behind the stand-in HTTP server. It knows the oracle's first error and, with probability
`1 - accuracy` per sample, errs the way ProcessBench-style judges do:

- a solution with an error: the error is missed (answer -1) with a probability that grows with how late it
  sits (`(k + 1) / n` of the mistakes at step k of n are misses), otherwise the answer is off by one step;
- a solution without an error: a false alarm at a random step.

With `malformed_rate` it also answers with empty text, prose without an index, a refusal or an index out
of range, which the judge verifier must record as `error`. Deterministic given (seed, prompt, sample index).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.policy.simulated_base import TextAnswerBackend, tagged_rng
from tasks.sources.synthetic import first_error, parse_question

KIND = "simulated-judge"
_PARAGRAPH_RE = re.compile(r"<paragraph_(\d+)>\n(.*?)\n</paragraph_\1>", re.DOTALL)
MALFORMED = ("", "Let me check each paragraph of the solution carefully.",
             "I'm sorry, but I can't help with grading this solution.", "\\boxed{99}")


class SimulatedJudgeConfig(BaseModel):
    """A stand-in judge model for the synthetic domain (use a real model via `openai` etc. elsewhere)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["simulated-judge"] = "simulated-judge"
    accuracy: float = Field(0.8, ge=0.0, le=1.0, description="Probability that a sample names the oracle's first "
                            "error exactly (-1 for a correct solution). ProcessBench reports F1 of roughly 0.5-0.8 "
                            "for open judges on GSM8K/MATH; 0.8 is a good judge.")
    malformed_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of samples that are malformed (empty, "
                                  "prose, a refusal, an out-of-range index), cycled in that order.")
    latency_s: float = Field(0.0, ge=0.0, description="Simulated seconds per request.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once (matters with latency).")
    max_batch: int = Field(256, ge=1, description="Requests the scheduler may hand over in one call.")


def policy_id(cfg: SimulatedJudgeConfig) -> str:
    return f"simulated-judge/v1/acc={cfg.accuracy}/malformed={cfg.malformed_rate}"


def judge_answer(prompt: str, seed: int | None, index: int, accuracy: float, malformed_rate: float) -> str:
    """The text of sample `index` for a judge prompt (pure)."""
    rng = tagged_rng("judge", seed, prompt, index)
    if malformed_rate > 0 and rng.random() < malformed_rate:
        return MALFORMED[rng.randrange(len(MALFORMED))]
    parsed = parse_question(prompt)
    steps = [m.group(2) for m in _PARAGRAPH_RE.finditer(prompt)]
    if parsed is None or not steps:
        return "I cannot find a problem of this domain with tagged paragraphs to check."
    spec, _ = parsed
    fe = first_error(spec, steps)
    truth = -1 if fe is None else fe
    n = len(steps)
    answer = truth
    if rng.random() >= accuracy:
        if truth == -1:
            answer = rng.randrange(n)  # false alarm
        elif rng.random() < (truth + 1) / n:
            answer = -1  # a late error is the easiest to miss
        else:
            answer = truth + rng.choice((-1, 1)) if 0 < truth < n - 1 else (1 if truth == 0 else truth - 1)
            if n == 1:
                answer = -1
    if answer == -1:
        return "Each paragraph follows from the problem and the paragraphs before it.\n\n\\boxed{-1}"
    return (f"Paragraph {answer} does not follow from what comes before it, and the paragraphs before it are "
            f"correct.\n\n\\boxed{{{answer}}}")


class SimulatedJudge(TextAnswerBackend):
    """Policy-protocol backend serving `judge_answer` (in-process; the stand-in server serves the same)."""

    def __init__(self, config: SimulatedJudgeConfig | None = None) -> None:
        config = config or SimulatedJudgeConfig()
        super().__init__(config, policy_id(config))

    def answer(self, prompt: str, seed: int | None, index: int) -> str:
        return judge_answer(prompt, seed, index, self.config.accuracy, self.config.malformed_rate)
