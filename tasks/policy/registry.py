"""Policy backends by config `kind`: one typed record per backend, the shape of every stepforge registry
(see `storage/exports/__init__.py`). A new backend is one module (a config model whose `kind` field is a
one-value `Literal`, a `policy_id(cfg)` function and the backend class) plus one line in `BACKENDS`;
`flows/config.py` builds its `policy` union from it.

Factories import their backend class when called, so heavy dependencies (torch, vLLM) load only in a
build that uses them; the config models import nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from storage.errors import CrossFieldError
from tasks.policy import hf_transformers, openai_compat, simulated, simulated_judge, simulated_prover, vllm_offline
from tasks.policy.base import Policy
from tasks.prompt import PromptConfig, load_template

__all__ = ["BACKENDS", "JUDGE_BACKENDS", "DEFAULT", "JUDGE_DEFAULT", "TAG", "Backend"]

TAG = "kind"
DEFAULT = "simulated"
JUDGE_DEFAULT = "simulated-judge"  # the judge's model when `judge.policy` names none


@dataclass(frozen=True)
class Backend:
    """`factory(cfg, prompt)` builds the backend; `identity(cfg)` is its policy id without building it (the
    manifest and the nodes table need the id, not a model); `check_prompt(cfg, prompt)`, where given, is a
    check against the `prompt` section a config can make alone (run by `BuildConfig`'s validators), raising
    `CrossFieldError` naming both fields; `check_environment(cfg)`, where given, is the preflight's check
    against the run (an API key the config names is set)."""

    name: str
    config: type[BaseModel]
    factory: Callable[[Any, PromptConfig], Policy]
    identity: Callable[[Any], str]
    check_prompt: Callable[[Any, PromptConfig], None] | None = None
    check_environment: Callable[[Any], None] | None = None  # preflight against the run (a key is set)
    domain: str | None = None  # the one problem domain a stand-in policy writes for; None: any (a real model)


def _simulated(cfg: simulated.SimulatedPolicyConfig, prompt: PromptConfig) -> Policy:
    return simulated.SimulatedPolicy(cfg, prompt.step_format)


def _simulated_prover(cfg: simulated_prover.SimulatedProverConfig, prompt: PromptConfig) -> Policy:
    return simulated_prover.SimulatedProver(cfg, prompt.step_format)


# Backends that tokenise extend token IDs at step boundaries: the segmenter's stop strings.
def _openai(cfg: openai_compat.OpenAIPolicyConfig, prompt: PromptConfig) -> Policy:
    return openai_compat.OpenAIPolicy(cfg, boundaries=prompt.stop)


def _transformers(cfg: hf_transformers.TransformersPolicyConfig, prompt: PromptConfig) -> Policy:
    return hf_transformers.TransformersPolicy(cfg, boundaries=prompt.stop)  # torch loads on first use


def _vllm(cfg: vllm_offline.VLLMPolicyConfig, prompt: PromptConfig) -> Policy:
    return vllm_offline.VLLMPolicy(cfg, boundaries=prompt.stop)  # vllm loads on first use


def _chat_needs_chatml(cfg: openai_compat.OpenAIPolicyConfig, prompt: PromptConfig) -> None:
    if cfg.endpoint == "chat" and (prompt.family != "chat" or prompt.chat_template != load_template("chatml")):
        raise CrossFieldError("`policy.endpoint=chat` sends messages and needs `prompt.family=chat` with the "
                              "ChatML chat template; use `policy.endpoint=completions` for other templates.",
                              "policy.endpoint", "prompt.family")


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("simulated", simulated.SimulatedPolicyConfig, _simulated, simulated.policy_id, domain="math"),
        Backend("simulated-prover", simulated_prover.SimulatedProverConfig, _simulated_prover,
                simulated_prover.policy_id, domain="lean"),
        Backend("openai", openai_compat.OpenAIPolicyConfig, _openai, openai_compat.policy_id,
                check_prompt=_chat_needs_chatml, check_environment=openai_compat.OpenAIPolicyConfig.verify_environment),
        Backend("transformers", hf_transformers.TransformersPolicyConfig, _transformers, hf_transformers.policy_id),
        Backend("vllm", vllm_offline.VLLMPolicyConfig, _vllm, vllm_offline.policy_id),
    )
}


def _simulated_judge(cfg: simulated_judge.SimulatedJudgeConfig, prompt: PromptConfig) -> Policy:
    return simulated_judge.SimulatedJudge(cfg)  # reads the judge's own prompt, not the policy's step format


# The models a judge (`judge.policy`) can ask: every policy backend that reads natural-language math (real
# models, and the synthetic domain's stand-in; not the Lean prover stand-in), plus the synthetic domain's
# simulated judge, which answers only first-error prompts and so is no backend for writing steps.
JUDGE_BACKENDS: dict[str, Backend] = {
    **{name: b for name, b in BACKENDS.items() if b.domain in (None, "math")},
    simulated_judge.KIND: Backend(simulated_judge.KIND, simulated_judge.SimulatedJudgeConfig, _simulated_judge,
                                  simulated_judge.policy_id, domain="math"),
}
