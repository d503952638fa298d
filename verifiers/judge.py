"""LLM-as-judge step verifier: ask a model for the earliest wrong step of a solution (ProcessBench style).

The judge renders one prompt per solution from a Jinja template (the text is handed in; the flow loads
`tasks/templates/judge-first-error.jinja` by default), asks the policy it was given for `votes` samples
(one request with `n = votes`), parses each answer into a step index (`-1`: no wrong step) and takes the
majority. The policy is any object with the policy protocol's shape (`generate(requests)`, `max_batch`,
optionally `independent_requests`): the flow builds it from the judge's own `judge.policy` section, so the
judge can be another model or server than the one that wrote the steps. This module imports nothing of
`tasks/`: the flow also hands in `request_factory`, which builds the backend's request objects.

Parsing is strict about what counts as an answer: the last `\\boxed{k}`, else an output that is only a
number, else a last line `answer: k`. Empty output, prose without an index, a refusal, an index outside
`-1 .. n_steps - 1` or a tie between the most voted indices is `error`, never a label.

Per solution `verify` returns one verdict: `invalid` with `score = k` when the majority puts the first
error at step k, `valid` with `score = -1` when it finds none, `error` otherwise. `step_verdicts` spreads it
over the steps: `valid` before k, `invalid` at k, `none` after k (the judge said nothing about them).
A backend that fails (a server that died) raises `JudgeBackendError`: that is not a verdict about the
solution, and the shard must fail so a rerun can resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import PolicyError
from verifiers.base import SolutionItem, Status, Verdict

NAME = "judge"
DEFAULT_TEMPLATE = "judge-first-error"

# (prompt, n, temperature, max_tokens, seed) -> the backend's request object. Handed in by the flow, so this
# module never imports the policy package.
RequestFactory = Callable[[str, int, float, int, int], Any]


class JudgeBackendError(PolicyError):
    """The judge's backend failed (not a verdict): the shard fails and a rerun resumes it."""


class JudgeConfig(BaseModel):
    """How the judge is asked and how its answers are counted (its model is `judge.policy`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["judge"] = "judge"
    votes: int = Field(1, ge=1, le=64, description="Samples per solution (one request with n = votes); the most "
                       "voted index wins, a tie is `error`.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature of the judge; 0 = greedy.")
    max_tokens: int = Field(1024, ge=1, description="Upper bound on the judge's answer length, in tokens.")
    template: str = Field(DEFAULT_TEMPLATE, description="Prompt template: a name in tasks/templates/ or a path "
                          "to a .jinja file. It sees `question` and `steps` (a list of strings).")
    seed: int = Field(0, description="Mixed into every judge request's seed with the prompt, so votes are "
                      "reproducible; the build seed is mixed in too.")

    @model_validator(mode="after")
    def _votes_need_sampling(self) -> "JudgeConfig":
        if self.votes > 1 and self.temperature == 0:
            raise ValueError(f"`judge.votes` = {self.votes} with `judge.temperature` = 0 asks for the same greedy "
                             "answer several times; set `judge.temperature` > 0 (e.g. 0.7) or `judge.votes` = 1.")
        return self


_BOXED_RE = re.compile(r"\\boxed\s*\{\s*([^{}]*?)\s*\}")
_INT_RE = re.compile(r"[-\u2212]?\d+")
_ANSWER_LINE_RE = re.compile(r"(?i)^\W*(?:final\s+)?(?:answer|index|earliest error)\W*(?:is)?\W*([-\u2212]?\d+)\W*$")
_REFUSAL_RE = re.compile(r"(?i)\b(?:I\s*(?:can(?:'|no)t|cannot|am unable|'m unable|won't)|as an ai|sorry)\b")


def parse_judgement(text: str, n_steps: int) -> tuple[int | None, str]:
    """(index, why): the step index an answer names (-1: no wrong step), or None and the reason it is not one."""
    stripped = (text or "").strip()
    if not stripped:
        return None, "empty output"
    raw: str | None = None
    boxed = _BOXED_RE.findall(stripped)
    if boxed:
        raw = boxed[-1].strip()
        if not _INT_RE.fullmatch(raw):
            return None, f"\\boxed{{{raw[:20]}}} is not a step index"
    elif _INT_RE.fullmatch(stripped.rstrip(".")):
        raw = stripped.rstrip(".")
    else:
        last = stripped.splitlines()[-1]
        m = _ANSWER_LINE_RE.match(last)
        if m:
            raw = m.group(1)
        elif _REFUSAL_RE.search(stripped):
            return None, "refusal"
        else:
            return None, "no step index in the output"
    k = int(raw.replace("\u2212", "-"))
    if not -1 <= k < n_steps:
        return None, f"index {k} out of range for {n_steps} steps"
    return k, "ok"


def majority(indices: Sequence[int | None]) -> tuple[int | None, str]:
    """The most voted index among the parsed votes; None on a tie or with no parsed vote."""
    counts = Counter(k for k in indices if k is not None)
    malformed = sum(k is None for k in indices)
    summary = ", ".join(f"{k}: {c}" for k, c in sorted(counts.items())) or "none parsed"
    if malformed:
        summary += f"; {malformed} malformed"
    if not counts:
        return None, summary
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, summary + "; tied"
    return ranked[0][0], summary


def step_verdicts(solution: Verdict, n_steps: int) -> list[Verdict]:
    """The judge's solution verdict spread over its steps (see the module docstring)."""
    if solution.status is Status.VALID or solution.status is Status.INVALID:
        k = int(solution.score) if solution.score is not None else -1
        out = []
        for i in range(n_steps):
            if k == -1 or i < k:
                out.append(Verdict(solution.verifier, solution.version, Status.VALID, 1.0, solution.detail))
            elif i == k:
                out.append(Verdict(solution.verifier, solution.version, Status.INVALID, 0.0, solution.detail))
            else:
                out.append(Verdict(solution.verifier, solution.version, Status.NONE, None,
                                   "after the judge's first error"))
        return out
    return [Verdict(solution.verifier, solution.version, solution.status, None, solution.detail)
            for _ in range(n_steps)]


def judge_labels(solution: Verdict, n_steps: int) -> list[bool | None]:
    """`steps.judge_label`: True before the judge's first error, False at it, None after it or undecided."""
    return [None if v.status is Status.NONE or not v.status.decided else v.status is Status.VALID
            for v in step_verdicts(solution, n_steps)]


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class JudgeVerifier:
    """`Verifier` over `SolutionItem`s through a policy backend; one verdict per solution."""

    name = NAME

    def __init__(self, config: JudgeConfig, policy: Any, template: str, request_factory: RequestFactory,
                 *, build_seed: int = 0) -> None:
        import jinja2
        from jinja2.sandbox import SandboxedEnvironment

        self.config = config
        self.policy = policy
        # Sandboxed: the template text comes from a config file, and may be anyone's.
        self._template = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                              autoescape=False).from_string(template)
        self._request = request_factory
        self._build_seed = build_seed
        template_hash = hashlib.sha256(template.encode()).hexdigest()[:8]
        self.version = f"1+{getattr(policy, 'policy_id', type(policy).__name__)}+tpl-{template_hash}"

    def render(self, item: SolutionItem) -> str:
        return self._template.render(question=item.question, steps=list(item.steps))

    async def verify(self, batch: Sequence[SolutionItem]) -> list[Verdict]:
        cfg = self.config
        verdicts: list[Verdict | None] = [None] * len(batch)
        asks: list[tuple[int, Any]] = []
        for i, item in enumerate(batch):
            if not item.steps:
                verdicts[i] = Verdict(self.name, self.version, Status.NONE, None, "no steps to judge")
                continue
            try:
                prompt = self.render(item)
            except Exception as exc:  # a template that does not fit the item: undecided, says why
                verdicts[i] = Verdict(self.name, self.version, Status.ERROR, None,
                                      f"template failed: {type(exc).__name__}: {exc}"[:300])
                continue
            seed = _seed(self._build_seed, cfg.seed, "judge", hashlib.sha256(prompt.encode()).hexdigest())
            asks.append((i, self._request(prompt, cfg.votes, cfg.temperature, cfg.max_tokens, seed)))
        outputs = await self._generate([req for _, req in asks])
        for (i, _), completions in zip(asks, outputs):
            n_steps = len(batch[i].steps)
            parsed = [parse_judgement(c.text, n_steps) for c in completions]
            k, summary = majority([p[0] for p in parsed])
            if k is None:
                reasons = sorted({why for idx, why in parsed if idx is None})
                detail = f"votes {summary}" + (f" ({'; '.join(reasons)})" if reasons else "")
                verdicts[i] = Verdict(self.name, self.version, Status.ERROR, None, detail[:300])
            else:
                status = Status.VALID if k == -1 else Status.INVALID
                verdicts[i] = Verdict(self.name, self.version, status, float(k), f"first error {k}; votes {summary}")
        return [v for v in verdicts if v is not None]

    async def _generate(self, requests: list[Any]) -> list[list[Any]]:
        """All requests at once: one call per `max_batch` chunk, or one call per request where the backend
        serves requests independently (an HTTP server with its own concurrency limit)."""
        if not requests:
            return []
        policy = self.policy
        try:
            if getattr(policy, "independent_requests", False):
                results = await asyncio.gather(*(policy.generate([r]) for r in requests))
                return [res[0] for res in results]
            size = max(1, int(getattr(policy, "max_batch", len(requests))))
            chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
            results = await asyncio.gather(*(policy.generate(chunk) for chunk in chunks))
            return [out for res in results for out in res]
        except Exception as exc:
            raise JudgeBackendError(
                f"judge backend {getattr(policy, 'policy_id', policy)!r} failed: {type(exc).__name__}: {exc}. "
                "The shard fails; rerun the build to resume once the judge server is back (finished shards "
                "are kept).", field="judge.policy") from exc

    async def aclose(self) -> None:
        close = getattr(self.policy, "aclose", None)
        if close is not None:
            await close()
