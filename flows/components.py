"""Config -> live objects: the registries that map config `kind`s to sources, policies, verifiers."""

from __future__ import annotations

from pathlib import Path

from flows.config import BuildConfig
from storage.errors import ConfigError
from tasks.policy.base import Policy
from tasks.policy.simulated import SimulatedPolicy
from tasks.search.rollout_cache import RolloutCache
from tasks.sources.base import SourceResult
from tasks.sources.files import load_file_source, verify_file_source
from tasks.sources.gsm8k import load_gsm8k, verify_gsm8k
from tasks.sources.hf import load_hf_source
from tasks.sources.synthetic import load_synthetic
from tasks.policy.simulated_judge import SimulatedJudge
from tasks.step_checks import StepVerifiers, judge_request
from verifiers.arith_check import ArithCheck
from verifiers.code_check import CodeCheck
from verifiers.judge import JudgeVerifier
from verifiers.outcome import OutcomeVerifier

SOURCES = {"synthetic": load_synthetic, "file": load_file_source, "gsm8k": load_gsm8k, "hf": load_hf_source}


# Checks against the run that are cheap enough to make before any work (the file exists, its columns match
# the mapping); loading the records stays in the flow, where bad ones are quarantined.
SOURCE_CHECKS = {"file": verify_file_source, "gsm8k": verify_gsm8k}


def load_source(cfg: BuildConfig) -> SourceResult:
    return SOURCES[cfg.source.kind](cfg.source)


def verify_source(cfg: BuildConfig) -> None:
    """Raises SourceError naming the `source.*` field when the source cannot be read at all."""
    check = SOURCE_CHECKS.get(cfg.source.kind)
    if check is not None:
        check(cfg.source)


def make_policy(cfg: BuildConfig) -> Policy:
    if cfg.policy.kind == "simulated":
        return SimulatedPolicy(cfg.policy, cfg.prompt.step_format)
    if cfg.policy.kind == "openai":
        from tasks.policy.openai_compat import OpenAIPolicy
        from tasks.prompt import load_template

        if cfg.policy.endpoint == "chat" and (cfg.prompt.family != "chat" or
                                              cfg.prompt.chat_template != load_template("chatml")):
            raise ConfigError("`policy.endpoint=chat` sends messages and needs `prompt.family=chat` with the ChatML "
                              "chat template; use `policy.endpoint=completions` for other templates.",
                              field="policy.endpoint", value=cfg.policy.endpoint)
        # Token-ID prompts (policy.tokenizer) extend at step boundaries: the segmenter's stop strings.
        return OpenAIPolicy(cfg.policy, boundaries=cfg.prompt.stop)
    # Local engines tokenise once and extend token IDs at step boundaries (the segmenter's stop strings).
    if cfg.policy.kind == "transformers":
        from tasks.policy.hf_transformers import TransformersPolicy

        return TransformersPolicy(cfg.policy, boundaries=cfg.prompt.stop)
    if cfg.policy.kind == "vllm":
        from tasks.policy.vllm_offline import VLLMPolicy

        return VLLMPolicy(cfg.policy, boundaries=cfg.prompt.stop)
    raise ConfigError(f"`policy.kind` {cfg.policy.kind!r} has no backend in this build.", field="policy.kind")


def make_verifier(cfg: BuildConfig) -> OutcomeVerifier:
    return OutcomeVerifier(cfg.verifier)


def judge_template(name: str) -> str:
    """The judge's prompt template text: a packaged template name, or a path to a .jinja file."""
    from tasks.prompt import load_template

    path = Path(name)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise ConfigError(f"`judge.template`: no file {name!r}; give a packaged template name (e.g. "
                              "judge-first-error) or the path of a .jinja file.", field="judge.template", value=name)
        return path.read_text(encoding="utf-8")
    try:
        return load_template(name)
    except ValueError as exc:
        raise ConfigError(f"`judge.template`: {exc}", field="judge.template", value=name) from None


def make_judge_policy(cfg: BuildConfig) -> Policy:
    """The judge's model from `judge.policy` (any backend, built like `policy`)."""
    if cfg.judge.policy.kind == "simulated-judge":
        return SimulatedJudge(cfg.judge.policy)
    return make_policy(cfg.model_copy(update={"policy": cfg.judge.policy}))


STEP_CHECKS = {"arith-check": ArithCheck, "code-check": CodeCheck}


def make_step_verifiers(cfg: BuildConfig) -> StepVerifiers:
    """The build's step checks and judge."""
    checks = [STEP_CHECKS[c.kind](c) for c in cfg.checks]
    judge = None
    if cfg.judge.enabled:
        judge = JudgeVerifier(cfg.judge, make_judge_policy(cfg), judge_template(cfg.judge.template), judge_request,
                              build_seed=cfg.seed)
    return StepVerifiers(checks, judge)


def rollout_cache_path(cfg: BuildConfig) -> Path | None:
    if not cfg.rollout_cache:
        return None
    if cfg.storage.is_remote:  # remote data: keep the cache on local disk
        return Path.home() / ".cache" / "stepforge" / "rollouts.sqlite"
    return Path(cfg.storage.root) / "_cache" / "rollouts.sqlite"


def make_rollout_cache(cfg: BuildConfig) -> RolloutCache | None:
    path = rollout_cache_path(cfg)
    return RolloutCache.shared(path) if path else None
