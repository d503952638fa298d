"""The policy interface: async, batched, `n` samples per prompt (vLLM `SamplingParams` style)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample continuations of one prompt."""

    n: int = 1
    """Number of independent samples of this prompt (one request, never n copies of the prompt)."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    max_tokens: int = 512
    """Upper bound on generated tokens per sample."""
    stop: tuple[str, ...] = ()
    """Generation stops before (or, with `include_stop_str_in_output`, after) the first of these."""
    include_stop_str_in_output: bool = False
    seed: int | None = None
    """Per-request seed; sample i of a request is seeded by (seed, i) so results are reproducible."""
    logprobs: bool = False
    """Return per-token log-probabilities where the backend can."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}.")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}.")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}.")
        if isinstance(self.stop, str):  # normalise form, never values
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    def cache_key(self) -> tuple:
        return (self.n, self.temperature, self.top_p, self.max_tokens, self.stop,
                self.include_stop_str_in_output, self.seed)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    params: SamplingParams
    prompt_token_ids: tuple[int, ...] | None = None
    """Token IDs of the prompt where the caller kept them, so prefix caches hit without re-tokenising."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    mean_logprob: float | None = None
    token_logprobs: tuple[float, ...] | None = None
    cached_tokens: int | None = None
    stop_reason: str | None = None  # the stop string matched, when finish_reason == "stop"


@dataclass
class PolicyUsage:
    """Accounting a backend keeps; totals land in the manifest and the summary."""

    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    retries: int = 0
    failures: int = 0

    def record(self, outs: "list[Completion]", prompt_tokens: int, cached_tokens: int = 0) -> None:
        """Count one answered request of ``len(outs)`` samples (the in-process backends' accounting)."""
        self.requests += 1
        self.samples += len(outs)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += sum(o.completion_tokens for o in outs)
        self.cached_tokens += cached_tokens

    def add(self, other: "PolicyUsage") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@runtime_checkable
class Policy(Protocol):
    """A policy model. `generate` returns, for each request, `request.params.n` completions."""

    policy_id: str
    """Stable identity of model + backend settings that change outputs; part of rollout-cache keys."""
    max_batch: int
    """How many requests the scheduler may hand over in one call."""
    usage: PolicyUsage
    # Optional `independent_requests: bool` (default False): True where each request is served on its own
    # (an HTTP server), so the scheduler passes requests one per call and routes each answer as it lands.

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]: ...

    async def aclose(self) -> None: ...


def derive_seed(*parts: Any, bits: int = 64) -> int:
    """The one seed-derivation rule: a `bits`-bit integer hashed from `parts` (joined by NUL), so seeds depend
    on what a request is (build seed, purpose, prompt, sample index), never on the order requests are made."""
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def default_policy_id(name: str, config: Any) -> str:
    """`<name>@<8 hex>`: the name plus a short hash of every config field that can change what is sampled.

    The rollout cache and the nodes table key on the policy id, so two configs that sample differently
    (another `min_p`, `top_k`, `extra_body`, dtype...) must never share one. Left out: `policy_id` itself
    and the config's `noise_fields` (where and how fast requests go: URLs, keys, concurrency, timeouts,
    retries, device placement), the same fields the build key ignores, so moving a server keeps the cache.
    New output-affecting fields are covered without touching this function: they are in by default.
    """
    exclude = {"policy_id", *getattr(config, "noise_fields", ())}
    content = config.model_dump(mode="json", exclude=exclude)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{name}@{digest[:8]}"


def apply_stop(text: str, stop: Sequence[str], include: bool) -> tuple[str, str, str | None]:
    """Cut `text` at the earliest stop string: (text, finish_reason, matched stop)."""
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, "stop", None
    i, s = best
    return (text[: i + len(s)] if include else text[:i]), "stop", s
