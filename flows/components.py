"""Config -> live objects, through the registries (sources, policy backends, verifiers), and the preflight
`verify(config)` that the CLI runs before any Prefect server starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.config import BuildConfig
from flows.stores import open_root
from storage.objectstore import ObjectStore, open_store
from tasks.policy.base import Policy
from tasks.policy.registry import BACKENDS
from tasks.search.rollout_cache import RolloutCache
from tasks.sources.base import SourceResult
from tasks.sources.registry import SOURCES
from verifiers.base import Verifier
from verifiers.registry import make_verifier as _make_verifier


def open_config_store(config: BuildConfig) -> ObjectStore:
    st = config.storage
    return open_root(st.root, endpoint_url=st.endpoint_url, region=st.region, profile=st.profile,
                     credentials_block=st.credentials_block)


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
    the records stays in the flow, where bad ones are quarantined), and the policy and verifier are
    described. Raises the `StepforgeError` that names the field at fault."""
    verify_source(cfg)  # first: a build that cannot start leaves no trace, not even an empty root folder
    backend = BACKENDS[cfg.policy.kind]
    if backend.check_environment is not None:
        backend.check_environment(cfg.policy)
    st = cfg.storage
    if "://" not in st.root:  # a local folder is made by the build (and a failure to make it reported there)
        root = st.root
    else:  # a credentials block is resolved through the Prefect API, i.e. inside the flow; here the root alone
        root = (open_store(st.root, endpoint_url=st.endpoint_url, region=st.region, profile=st.profile)
                if st.credentials_block else open_config_store(cfg)).root
    return Preflight(store=root, source=cfg.source.kind, policy=policy_id(cfg), verifier=cfg.verifier.kind)


def rollout_cache_path(cfg: BuildConfig) -> Path | None:
    if not cfg.rollout_cache:
        return None
    root = cfg.storage.root
    if "://" in root:  # remote data: keep the cache on local disk
        return Path.home() / ".cache" / "stepforge" / "rollouts.sqlite"
    return Path(root) / "_cache" / "rollouts.sqlite"


def make_rollout_cache(cfg: BuildConfig) -> RolloutCache | None:
    path = rollout_cache_path(cfg)
    return RolloutCache.shared(path) if path else None
