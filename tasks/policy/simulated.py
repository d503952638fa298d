"""The simulated policy of the synthetic arithmetic domain: a stand-in LLM whose mistakes are known.

It reads only the prompt text (so it works the same in-process and behind the stand-in HTTP server),
continues the written steps, makes a mistake at a per-step rate that grows with problem difficulty
(wrong result, wrong operand, wrong operation), carries wrong values forward, and is deterministic given
(seed, prompt, sample index).

Two kinds of noise make its outcome-based (Monte Carlo) labels as unreliable as a real model's, both off
by default: **recovery** (after a mistake, a later step silently goes back to the right value, so the
solution ends on the gold answer although a step was wrong) and **lucky answers** (a wrong chain's last
step lands on the gold answer). Either way the oracle still knows every step's truth
(`tasks.sources.synthetic.first_error`, `masked_error`), so label noise can be measured exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.render import StepFormat, segment
from tasks.policy.base import Completion, apply_stop, derive_seed
from tasks.policy.simulated_base import SimulatedBackend, approx_tokens
from tasks.sources.synthetic import ArithSpec, apply_op, fmt_num, parse_question, parse_step, render_step

ERROR_KINDS = ("wrong_result", "wrong_operand", "wrong_operation")
_SWAP = {"+": "-", "-": "+", "*": "+", "/": "*"}


class SimulatedPolicyConfig(BaseModel):
    """The default policy: simulates an LLM on the synthetic arithmetic domain."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["simulated"] = "simulated"
    step_error_rate: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Base probability of a mistake per step; the actual rate is rate × (0.5 + difficulty), "
        "difficulty in [0, 1] from chain length and number size.",
    )
    recovery_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Probability, per step written while the carried value is wrong, that the step silently "
        "recomputes from the right value (the question's chain) instead: the solution can then end on the gold "
        "answer although an earlier step was wrong, which is what makes Monte Carlo labels of real policies "
        "noisy (a wrong step gets c > 0). 0 (default): a mistake is carried to the end.",
    )
    lucky_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Probability that a chain that is still wrong at its last step ends on the gold answer anyway "
        "(the last step's result is the gold value, a compensating slip). 0 (default): never.",
    )
    latency_s: float = Field(0.0, ge=0.0, description="Simulated seconds per request (0 = as fast as possible).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once (matters with latency).")
    max_batch: int = Field(256, ge=1, description="Requests the scheduler may hand over in one call.")
    code_steps: bool = Field(
        False, description="Write each step's computation also as inline Python, print(a op x) inside code markers "
        "after the equation (rStar-Math-style code-augmented steps), so the code step check runs in this domain. "
        "The code computes what the step's operands give; a wrong stated result then contradicts it.")


@dataclass(frozen=True)
class _Context:
    """What a prompt determines, shared by all samples of one request."""

    spec: ArithSpec
    done: int  # steps already written (that parse as steps)
    value: Fraction  # the value the last written step carries, right or wrong
    rate: float  # per-step mistake probability for this problem
    prompt_tokens: int


def _rng(seed: int | None, prompt: str, index: int) -> random.Random:
    return random.Random(derive_seed(seed, index, prompt))


def policy_id(cfg: SimulatedPolicyConfig) -> str:
    """The policy's identity (rollout-cache keys, the nodes table) from its config alone."""
    # The noise settings are part of the identity (the rollout cache keys on it), but only when on, so a
    # clean policy keeps the id (and the cache entries) it had before noise existed.
    noise = "".join(f"/{name}={value}" for name, value in
                    (("recover", cfg.recovery_rate), ("lucky", cfg.lucky_rate)) if value)
    # Code steps are other text, so other cache keys; the default id is unchanged.
    return f"simulated-arith/v1/err={cfg.step_error_rate}{noise}" + ("/code" if cfg.code_steps else "")


def with_code(step: str, a: Fraction, op: str, x: Fraction) -> str:
    """`step` with its computation as inline code right after the equation sentence (before "The answer
    is"), on the numbers as written, so the code and the prose disagree exactly when the stated result does
    not follow from the written operands."""
    code = f" <code>print({fmt_num(a)} {op} {fmt_num(x)})</code>"
    head, sep, tail = step.partition(". ")
    return f"{head}.{code}{' ' + tail if sep else ''}" if sep else step.rstrip(".") + "." + code


class SimulatedPolicy(SimulatedBackend):
    def __init__(self, config: SimulatedPolicyConfig | None = None, step_format: StepFormat | None = None) -> None:
        config = config or SimulatedPolicyConfig()
        super().__init__(config, policy_id(config))
        self.step_format = step_format or StepFormat()

    # The pure part, no I/O. `sample_n` is what a request runs: everything the prompt alone determines
    # (the question's chain, the steps already written, the value they carry) is worked out once per
    # request, not once per sample; each sample then only draws its own mistakes. Outputs are exactly
    # those of n calls of `sample` (tested).
    def sample_n(self, prompt: str, seed: int | None, n: int, stop: Sequence[str] = (),
                 include_stop: bool = False, max_tokens: int = 512, logprobs: bool = False) -> list[Completion]:
        ctx = self._context(prompt)
        return [self._sample(ctx, prompt, seed, i, stop, include_stop, max_tokens, logprobs) for i in range(n)]

    def sample(self, prompt: str, seed: int | None, index: int, stop: Sequence[str] = (),
               include_stop: bool = False, max_tokens: int = 512, logprobs: bool = False) -> Completion:
        """Sample `index` of `prompt` (what the stand-in server calls, one sample at a time)."""
        return self._sample(self._context(prompt), prompt, seed, index, stop, include_stop, max_tokens, logprobs)

    def _context(self, prompt: str) -> "_Context | None":
        parsed = parse_question(prompt)
        if parsed is None:
            return None
        spec, q_end = parsed
        steps = [s.text for s in segment(prompt[q_end:], self.step_format) if parse_step(s.text) is not None]
        # Carry what was written, right or wrong.
        value = parse_step(steps[-1]).c if steps else Fraction(spec.start)
        return _Context(spec, len(steps), value, self.config.step_error_rate * (0.5 + spec.difficulty),
                        approx_tokens(prompt))

    def _sample(self, ctx: "_Context | None", prompt: str, seed: int | None, index: int, stop: Sequence[str],
                include_stop: bool, max_tokens: int, logprobs: bool) -> Completion:
        rng = _rng(seed, prompt, index)
        if ctx is None:
            text, lps = "I cannot solve this problem.", [-3.0]
        else:
            text, lps = self._continue(ctx, rng)
        full_len = len(text)
        text, finish, matched = apply_stop(text, stop, include_stop)
        if approx_tokens(text) > max_tokens:
            text, finish, matched = text[: max_tokens * 4], "length", None
        # Log-probs are per step; keep those of the steps that survived the cut.
        kept = lps[: max(1, text.count(self.step_format.separator) + 1)] if lps else []
        mean_lp = sum(kept) / len(kept) if kept else None
        if finish == "stop" and matched is None and len(text) == full_len:
            finish = "stop"  # natural end of solution (EOS)
        return Completion(
            text=text, finish_reason=finish, prompt_tokens=ctx.prompt_tokens if ctx else approx_tokens(prompt),
            completion_tokens=approx_tokens(text),
            mean_logprob=mean_lp if logprobs else None,
            token_logprobs=tuple(kept) if logprobs else None, stop_reason=matched,
        )

    def _continue(self, ctx: "_Context", rng: random.Random) -> tuple[str, list[float]]:
        fmt = self.step_format
        spec, value, done, rate = ctx.spec, ctx.value, ctx.done, ctx.rate
        truth = spec.value_chain
        pieces: list[str] = []
        lps: list[float] = []
        # A prompt whose steps already run past the chain still gets an answer, never a repair.
        if done >= len(spec.ops):
            return f"The answer is {fmt_num(value)}.", [-0.1]
        recovery, lucky = self.config.recovery_rate, self.config.lucky_rate
        last = len(spec.ops) - 1
        # Numbers are ints while whole, Fractions otherwise (`synthetic.apply_op`): the same values and texts.
        value = value.numerator if value.denominator == 1 else value
        for i in range(done, len(spec.ops)):
            op, x = spec.ops[i]
            a, xv, used_op = value, x, op
            # Noise draws happen only when the rate is > 0, so a clean policy's random stream (and with it the
            # default build's content hash) is exactly what it was before noise existed.
            if recovery and a != truth[i] and rng.random() < recovery:
                a = truth[i]  # silently back on the question's chain
            mistake = rng.random() < rate
            if mistake:
                kind = rng.choice(ERROR_KINDS)
                if kind == "wrong_operand":
                    xv = max(1, x + rng.choice([-2, -1, 1, 2, 3]))
                    if xv == x:
                        xv = x + 1
                elif kind == "wrong_operation":
                    used_op = _SWAP[op]
            c = apply_op(a, used_op, xv)
            if mistake and kind == "wrong_result":
                c = c + rng.choice([-3, -2, -1, 1, 2, 10])
            # Never land on the true value by accident: without recovery and luck, once wrong, a solution stays
            # wrong, which makes c == 0 after the first error an exact invariant of the clean domain.
            if (mistake or a != truth[i]) and c == truth[i + 1]:
                c += 1
            if i == last and lucky and c != truth[i + 1] and rng.random() < lucky:
                c = truth[i + 1]  # a wrong chain ends on the gold answer
            text = render_step(spec, i, a, used_op, xv, c)
            if self.config.code_steps:
                text = with_code(text, a, used_op, xv)
            pieces.append(fmt.render_step(i, text))
            lps.append(round(-1.2 - 0.6 * rng.random(), 4) if mistake else round(-0.05 - 0.3 * rng.random(), 4))
            value = c
        return "".join(pieces), lps
