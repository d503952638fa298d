"""`policy.kind=simulated-prover`: a stand-in Lean prover for the formal domain (`source.kind=synthetic-lean`),
writing one tactic per step with the simulated policy's known mistakes.

It reads only the prompt: the last `theorem synth_… : <chain> = <answer> := by` in it gives the problem's
chain of operations, and the `have hᵢ : <chain up to i> = <value> := by norm_num` steps already written give
the value the proof carries (right or wrong). From there it asks the simulated policy (same mistake model,
same rates, deterministic in (seed, prompt, sample)) to continue the informal solution, and formalises each
new step as the next `have` (a wrong value makes a false `have`, which Lean rejects on its line), then closes
with `exact hₙ`. The closing tactic ends the completion without a separator (end of sequence), so a one-step
expansion that writes it is a finished proof.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.render import StepFormat, segment
from tasks.formal import closing_tactic, step_tactic
from tasks.policy.base import Completion, apply_stop
from tasks.policy.simulated_base import SimulatedBackend
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.sources.synthetic import ArithSpec, render_step

_THEOREM_RE = re.compile(r"theorem synth_\w+ : (?P<lhs>.+?) = (?P<answer>-?\d+) := by")
_START_RE = re.compile(r"\((?P<a>\d+) : ℚ\)")
_OP_RE = re.compile(r"(?P<op>[-+*/]) (?P<x>\d+)")
_HAVE_RE = re.compile(r"^have \S+ : .+ = (?P<value>[-()\d /]+?) := by norm_num$")
# The informal text the prover thinks in needs a name and a unit; only the chain matters.
_NAME, _UNIT = "Ava", "apples"


class SimulatedProverConfig(BaseModel):
    """A simulated Lean prover for `source.kind=synthetic-lean` (mistakes as the simulated policy's)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["simulated-prover"] = "simulated-prover"
    step_error_rate: float = Field(0.1, ge=0.0, le=1.0, description="Base probability of a wrong `have` per "
                                   "step, scaled by difficulty as the simulated policy's step errors are.")
    recovery_rate: float = Field(0.0, ge=0.0, le=1.0, description="As the simulated policy's: a later step goes "
                                 "back to the right value after a mistake (its `have` is then true again).")
    latency_s: float = Field(0.0, ge=0.0, description="Simulated seconds per request (0 = as fast as possible).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once (matters with latency).")
    max_batch: int = Field(256, ge=1, description="Requests the scheduler may hand over in one call.")


def policy_id(cfg: SimulatedProverConfig) -> str:
    recover = f"/recover={cfg.recovery_rate}" if cfg.recovery_rate else ""
    return f"simulated-prover/v1/err={cfg.step_error_rate}{recover}"


def parse_theorem(text: str) -> tuple[ArithSpec, int] | None:
    """The chain of the last synthetic theorem in `text`, and where its statement ends."""
    found = list(_THEOREM_RE.finditer(text))
    if not found:
        return None
    m = found[-1]
    start = _START_RE.search(m["lhs"])
    if start is None:
        return None
    ops = tuple((o["op"], int(o["x"])) for o in _OP_RE.finditer(m["lhs"], start.end()))
    if not ops:
        return None
    return ArithSpec(_NAME, _UNIT, int(start["a"]), ops), m.end()


def have_value(tactic: str) -> Fraction | None:
    """The value a `have hᵢ : … = v := by norm_num` step states (`12`, `(-3)`, `(7 / 2)`, `((-7) / 2)`)."""
    m = _HAVE_RE.match(tactic.strip())
    if m is None:
        return None
    num, _, den = m["value"].replace("(", "").replace(")", "").replace(" ", "").partition("/")
    try:
        return Fraction(int(num), int(den) if den else 1)
    except (ValueError, ZeroDivisionError):
        return None


class SimulatedProver(SimulatedBackend):
    def __init__(self, config: SimulatedProverConfig | None = None, step_format: StepFormat | None = None) -> None:
        config = config or SimulatedProverConfig()
        super().__init__(config, policy_id(config))
        self.step_format = step_format or StepFormat()
        # The informal solver it formalises: the simulated policy, over its own default step format.
        self._informal_format = StepFormat()
        self._informal = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=self.config.step_error_rate,
                                                               recovery_rate=self.config.recovery_rate),
                                         self._informal_format)

    def sample_n(self, prompt: str, seed: int | None, n: int, stop: Sequence[str] = (), include_stop: bool = False,
                 max_tokens: int = 512, logprobs: bool = False) -> list[Completion]:
        ctx = self._context(prompt)
        return [self._sample(ctx, prompt, seed, i, stop, include_stop, max_tokens, logprobs) for i in range(n)]

    def sample(self, prompt: str, seed: int | None, index: int, stop: Sequence[str] = (), include_stop: bool = False,
               max_tokens: int = 512, logprobs: bool = False) -> Completion:
        """Sample `index` of `prompt` (what the stand-in server calls, one sample at a time): exactly
        `sample_n(prompt, seed, n)[index]` for any n > index."""
        return self._sample(self._context(prompt), prompt, seed, index, stop, include_stop, max_tokens, logprobs)

    def _context(self, prompt: str) -> tuple[ArithSpec, int, str] | None:
        """(the theorem's chain, `have` steps already written, the informal prompt the simulated policy
        continues), or None when the prompt holds no synthetic theorem."""
        parsed = parse_theorem(prompt)
        if parsed is None:
            return None
        spec, end = parsed
        values: list[Fraction] = []
        for s in segment(prompt[end:], self.step_format):
            v = have_value(s.text)
            if v is not None:
                values.append(v)
        # The informal solution so far, carrying the written values: what the simulated policy continues.
        informal, a = [], Fraction(spec.start)
        for i, c in enumerate(values[: len(spec.ops)]):
            op, x = spec.ops[i]
            informal.append(self._informal_format.render_step(i, render_step(spec, i, a, op, Fraction(x), c)))
            a = c
        return spec, len(values), spec.question() + "\n" + "".join(informal)

    def _sample(self, ctx: tuple[ArithSpec, int, str] | None, prompt: str, seed: int | None, index: int,
                stop: Sequence[str], include_stop: bool, max_tokens: int, logprobs: bool) -> Completion:
        tokens = max(1, -(-len(prompt) // 4))
        if ctx is None:
            return Completion("sorry", "stop", tokens, 1, -3.0 if logprobs else None, (-3.0,) if logprobs else None)
        spec, done, informal_prompt = ctx
        comp = self._informal.sample(informal_prompt, seed, index, logprobs=True, max_tokens=1 << 30)
        new = [s.text for s in segment(comp.text, self._informal_format)] if done < len(spec.ops) else []
        lps = list(comp.token_logprobs or ())
        lines, line_lps = [], []
        for j, text in enumerate(new):
            lines.append(step_tactic(spec, done + j, text))
            line_lps.append(lps[j] if j < len(lps) else -0.1)
        closing = closing_tactic(spec, done + len(new))
        pieces = [self.step_format.render_step(done + j, t) for j, t in enumerate(lines)]
        pieces.append(self.step_format.head(done + len(lines)) + closing)  # then end of sequence
        line_lps.append(-0.02)
        text = "".join(pieces)
        full_len = len(text)
        text, finish, matched = apply_stop(text, stop, include_stop)
        if -(-len(text) // 4) > max_tokens:
            text, finish, matched = text[: max_tokens * 4], "length", None
        kept = line_lps[: text.count(self.step_format.separator) + 1] if len(text) < full_len else line_lps
        return Completion(text=text, finish_reason=finish, prompt_tokens=tokens,
                          completion_tokens=max(1, -(-len(text) // 4)),
                          mean_logprob=sum(kept) / len(kept) if logprobs and kept else None,
                          token_logprobs=tuple(kept) if logprobs else None, stop_reason=matched)
