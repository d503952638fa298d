"""What the in-process stand-in models share (the simulated policy, judge, prover and author): the policy
protocol's batching limits, usage accounting and simulated latency around a pure, seeded `sample_n`, and the
deterministic token count and random streams their texts are drawn from. Each model keeps its own texts."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from typing import Any, Sequence

from tasks.policy.base import Completion, GenerationRequest, PolicyUsage, apply_stop

__all__ = ["SimulatedBackend", "TextAnswerBackend", "approx_tokens", "tagged_rng"]


def approx_tokens(text: str) -> int:
    # A rough BPE-like count: what matters is that it is deterministic and adds up.
    return max(1, math.ceil(len(text) / 4)) if text else 0


def tagged_rng(tag: str, seed: int | None, prompt: str, index: int) -> random.Random:
    """The random stream of sample `index` for `prompt`: a function of its inputs only, so a sample is the
    same in-process, over HTTP, after a resume and on any worker. `tag` keeps models' streams apart."""
    digest = hashlib.blake2b(f"{tag}\x00{seed}\x00{index}\x00{prompt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class SimulatedBackend:
    """The policy protocol around `sample_n`. `config` needs `latency_s`, `max_concurrency` and `max_batch`."""

    def __init__(self, config: Any, policy_id: str) -> None:
        self.config = config
        self.policy_id = policy_id
        self.max_batch = config.max_batch
        self.usage = PolicyUsage()
        self._sem = asyncio.Semaphore(config.max_concurrency)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: GenerationRequest) -> list[Completion]:
        if self.config.latency_s > 0:
            async with self._sem:
                await asyncio.sleep(self.config.latency_s)
        p = req.params
        outs = self.sample_n(req.prompt, p.seed, p.n, p.stop, p.include_stop_str_in_output, p.max_tokens, p.logprobs)
        self.usage.record(outs, outs[0].prompt_tokens if outs else 0)
        return outs

    async def aclose(self) -> None:
        return None

    def sample_n(self, prompt: str, seed: int | None, n: int, stop: Sequence[str] = (), include_stop: bool = False,
                 max_tokens: int = 512, logprobs: bool = False) -> list[Completion]:
        raise NotImplementedError


class TextAnswerBackend(SimulatedBackend):
    """A stand-in whose sample is one whole answer text (`answer`), cut by stop strings and `max_tokens`."""

    mean_logprob = -0.1  # a constant: these models' answers carry no real likelihood

    def answer(self, prompt: str, seed: int | None, index: int) -> str:
        raise NotImplementedError

    def sample(self, prompt: str, seed: int | None, index: int, stop: Sequence[str] = (),
               include_stop: bool = False, max_tokens: int = 512, logprobs: bool = False) -> Completion:
        text, finish, matched = apply_stop(self.answer(prompt, seed, index), stop, include_stop)
        if approx_tokens(text) > max_tokens:
            text, finish, matched = text[: max_tokens * 4], "length", None
        lp = self.mean_logprob
        return Completion(text=text, finish_reason=finish, prompt_tokens=approx_tokens(prompt),
                          completion_tokens=approx_tokens(text), stop_reason=matched,
                          mean_logprob=lp if logprobs else None, token_logprobs=(lp,) if logprobs else None)

    def sample_n(self, prompt: str, seed: int | None, n: int, stop: Sequence[str] = (), include_stop: bool = False,
                 max_tokens: int = 512, logprobs: bool = False) -> list[Completion]:
        return [self.sample(prompt, seed, i, stop, include_stop, max_tokens, logprobs) for i in range(n)]
