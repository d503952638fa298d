"""Config -> live objects, through the registries (sources, policy backends, verifiers), and the preflight
`verify(config)` that the CLI runs before any Prefect server starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import BuildConfig
from flows.runners import check_runner
from flows.stores import open_root
from storage.dedup import check_benchmarks
from storage.errors import ConfigError
from storage.objectstore import ObjectStore, open_store
from tasks.formal import FormalLabeller, make_formal_checker
from tasks.policy.base import Policy
from tasks.policy.registry import BACKENDS, JUDGE_BACKENDS
from tasks.search.rollout_cache import RolloutCache
from tasks.sources.base import SourceResult
from tasks.sources.registry import SOURCES
from tasks.step_checks import StepVerifiers, judge_request
from verifiers.base import Verifier
from verifiers.registry import make_verifier as _make_verifier


def open_config_store(config: BuildConfig) -> ObjectStore:
    return open_root(config.storage)


def load_source(cfg: BuildConfig) -> SourceResult:
    return SOURCES[cfg.source.kind].load(cfg.source)


def verify_source(cfg: BuildConfig) -> None:
    """Raises SourceError naming the `source.*` field when the source cannot be read at all."""
    SOURCES[cfg.source.kind].verify(cfg.source)


def policy_id(cfg: BuildConfig) -> str:
    """The policy's identity from the config alone: no backend, no model load."""
    return BACKENDS[cfg.policy.kind].identity(cfg.policy)


def make_policy(cfg: BuildConfig) -> Policy:
    return BACKENDS[cfg.policy.kind].factory(cfg.policy, cfg.prompt)


def make_verifier(cfg: BuildConfig) -> Verifier:
    return _make_verifier(cfg.verifier)


@dataclass(frozen=True)
class Preflight:
    """What a build will use, as the preflight found it."""

    store: str  # the store's root URI
    source: str
    policy: str  # policy id
    verifier: str  # verifier name


def verify(cfg: BuildConfig) -> Preflight:
    """Checks against the run that are cheap enough to make before any work, and before the Prefect server
    starts: the store opens, the source can be read (the file exists, its columns match the mapping; loading
    the records stays in the flow, where bad ones are quarantined), benchmark files exist, the policy's and the
    judge's backends find what they need in the environment (an API key), and the policy and verifier are
    described. Raises the `StepforgeError` that names the field at fault."""
    verify_source(cfg)  # first: a build that cannot start leaves no trace, not even an empty root folder
    check_benchmarks(cfg.decontaminate)
    backend = BACKENDS[cfg.policy.kind]
    if backend.check_environment is not None:
        backend.check_environment(cfg.policy)
    check_judge_environment(cfg)
    check_runner(cfg.concurrency)  # an uninstalled Dask/Ray integration: say which extra, before any work
    _verify_lean_commands(cfg)
    st = cfg.storage
    if "://" not in st.root:  # a local folder is made by the build (and a failure to make it reported there)
        root = st.root
    else:  # a credentials block is resolved through the Prefect API, i.e. inside the flow; here the root alone
        root = (open_store(st) if st.credentials_block else open_config_store(cfg)).root
    return Preflight(store=root, source=cfg.source.kind, policy=policy_id(cfg), verifier=cfg.verifier.kind)


def _verify_lean_commands(cfg: BuildConfig) -> None:
    """A REPL command that cannot start, or a Kimina key variable that is not set, would make every proof an
    `error` verdict or fail every shard: say so before any work instead."""
    from verifiers.lean.environment import check_lean_environment

    sections = [("verifier.lean", getattr(cfg.verifier, "lean", None))]
    if cfg.formal.enabled:
        sections.append(("formal.lean", cfg.formal.lean))
    for where, lean in sections:
        check_lean_environment(lean, where)


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
    """The judge's model from `judge.policy` (any record of `JUDGE_BACKENDS`, built like `policy`)."""
    return JUDGE_BACKENDS[cfg.judge.policy.kind].factory(cfg.judge.policy, cfg.prompt)


def make_step_verifiers(cfg: BuildConfig) -> StepVerifiers:
    """The build's step checks and judge, through the verifier registry."""
    checks = [_make_verifier(c) for c in cfg.checks]
    judge = None
    if cfg.judge.enabled:
        judge = _make_verifier(cfg.judge, make_judge_policy(cfg), template=judge_template(cfg.judge.template),
                               request_factory=judge_request, build_seed=cfg.seed)
    return StepVerifiers(checks, judge)


def check_judge_environment(cfg: BuildConfig) -> None:
    """The preflight's check of the judge's backend against the run, as for `policy` (an API key the config
    names is set), with the error naming `judge.policy.*`."""
    if not cfg.judge.enabled:
        return
    check = JUDGE_BACKENDS[cfg.judge.policy.kind].check_environment
    if check is None:
        return
    try:
        check(cfg.judge.policy)
    except ConfigError as exc:
        # The backend names its own section (`policy.api_key_env`); here that section is `judge.policy`.
        raise ConfigError(str(exc).replace("`policy.", "`judge.policy."),
                          field=f"judge.{exc.field}" if exc.field else "judge.policy", value=exc.value) from None


def make_formal_labeller(cfg: BuildConfig, slot: Any = None) -> FormalLabeller | None:
    """The build's formal labeller (`formal` section), or None when formal labels are off. `slot`: an async
    context manager factory entered around every batch sent to Lean (the Lean slots' global limit)."""
    checker = make_formal_checker(cfg.formal)
    return None if checker is None else FormalLabeller(checker, slot, tactic_mode=cfg.formal.mode == "tactic")


def rollout_cache_path(cfg: BuildConfig) -> Path | None:
    if not cfg.rollout_cache:
        return None
    if cfg.storage.is_remote:  # remote data: keep the cache on local disk
        return Path.home() / ".cache" / "stepforge" / "rollouts.sqlite"
    return Path(cfg.storage.root) / "_cache" / "rollouts.sqlite"


def make_rollout_cache(cfg: BuildConfig) -> RolloutCache | None:
    path = rollout_cache_path(cfg)
    return RolloutCache.shared(path) if path else None
