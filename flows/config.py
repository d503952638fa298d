"""`BuildConfig`: the one model that is the CLI's config file, the flow's parameter and the Prefect UI form.

Checks a config can do alone run at construction; errors name the dotted field (`search.k`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.dedup import DecontamConfig, DedupConfig
from storage.errors import ConfigError, CrossFieldError
from storage.objectstore import StorageConfig  # re-exported: the build config holds one
from storage.schema import content_id
from tasks.budget import BudgetConfig
from tasks.formal import LEAN_NOISE_FIELDS, FormalConfig
from tasks.pairs import PairsConfig
from tasks.policy import registry as policies
from tasks.prompt import PromptConfig
from tasks.pseudo_gold import PseudoGoldConfig
from tasks.search import registry as searches
from tasks.sources import registry as sources
from verifiers import registry as verifiers
from verifiers.arith_check import ArithCheckConfig


# Each plug-in section of the config: its registry, discriminator field and default. The unions below, the
# default tags and the error paths all come from here, so a new registry line is all a plug-in needs.
_PLUGINS: dict[str, tuple[dict[str, Any], str, str]] = {
    "source": (sources.SOURCES, sources.TAG, sources.DEFAULT),
    "policy": (policies.BACKENDS, policies.TAG, policies.DEFAULT),
    "search": (searches.ALGORITHMS, searches.TAG, searches.DEFAULT),
    "verifier": ({n: v for n, v in verifiers.VERIFIERS.items() if v.role == "outcome"}, verifiers.TAG,
                 verifiers.DEFAULT),
}


def _union(section: str) -> Any:
    """The config union of one section's plug-ins, told apart by their tag field."""
    registry, tag, _ = _PLUGINS[section]
    configs = tuple(r.config for r in registry.values())
    return configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator=tag)]


def _default(section: str) -> Any:
    registry, _, name = _PLUGINS[section]
    return registry[name].config


SourceConfig = _union("source")
PolicyConfig = _union("policy")
SearchConfig = _union("search")
VerifierConfig = _union("verifier")


def _tagged(configs: tuple[type[BaseModel], ...]) -> Any:
    return configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator="kind")]


# The judge's model: any record of `JUDGE_BACKENDS` (every policy backend, and the simulated judge).
JudgePolicyConfig = _tagged(tuple(b.config for b in policies.JUDGE_BACKENDS.values()))
# Step checks: the step verifiers that need no model; the one that asks a model is the `judge` section.
StepCheckConfig = _tagged(tuple(v.config for v in verifiers.step_checks()))
(_JUDGE,) = verifiers.judges()


class JudgeSection(_JUDGE.config):  # type: ignore[name-defined,misc]
    """The LLM judge (`verifiers/judge.py`): how it is asked, and the model it asks (`policy`, any backend, so
    it can be another model or server than the one writing the steps)."""

    enabled: bool = Field(True, description="Ask the judge for every solution's first wrong step; its verdicts go "
                          "to `steps.verdicts` and `steps.judge_label`.")
    policy: JudgePolicyConfig = Field(default_factory=policies.JUDGE_BACKENDS[policies.JUDGE_DEFAULT].config,
                                      description="The judge's model: `simulated-judge` (the synthetic domain's "
                                      "stand-in, default), or `openai` / `transformers` / `vllm` like `policy`.")

    @model_validator(mode="before")
    @classmethod
    def _default_policy_tag(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("policy"), dict) and "kind" not in data["policy"]:
            data = {**data, "policy": {"kind": policies.JUDGE_DEFAULT, **data["policy"]}}
        return data


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of solutions and rollouts.")
    max_tokens: int = Field(1024, ge=1, description="Token limit per completion.")


class ConcurrencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shards: int = Field(2, ge=1, description="Shard tasks running at once.")
    policy_slots: str | None = Field(
        None, min_length=1,
        description="Name of a Prefect global concurrency limit (`prefect gcl create NAME --limit N`) of which "
        "each shard task holds one slot while it runs, so every build sharing one model fleet stays within "
        "N shards at once. None: no limit beyond `shards`.")
    lean_slots: str | None = Field(
        None, min_length=1,
        description="Name of a Prefect global concurrency limit (`prefect gcl create NAME --limit N`) of which "
        "every batch of proofs sent to Lean holds one slot while Lean checks it (the `formal` section's checks "
        "and, with `verifier.kind=lean`, the outcome verifier's rollout checks), so every "
        "build sharing one Lean server cluster stays within N batches at once. None: no limit beyond the Lean "
        "backend's own (`formal.lean.max_repls` / `max_concurrency`).")
    runner: Literal["threads", "dask", "ray", "deployments"] = Field(
        "threads",
        description="Where shards run: `threads` of the flow's process (default); `dask`, a Dask cluster "
        "(extra `dask`): a local cluster of `shards` worker processes, or the cluster at `address`; `ray`, a "
        "Ray cluster (extra `ray`), likewise; `deployments`: each shard is a run of the `deployment` below "
        "(prefect.yaml's build-shard), picked up by whichever worker of its pool is free, `shards` at once, the "
        "build committing once all are staged (the root must be one every worker reaches: S3, or a shared "
        "folder). The data is the same on every runner.")
    address: str | None = Field(
        None, min_length=1,
        description="Scheduler of an existing cluster for `runner` dask (tcp://host:8786) or ray "
        "(the head's GCS address host:6379, or auto; a ray:// Ray Client address is untested). None: start a local "
        "cluster for the build and stop it after.")
    deployment: str = Field(
        "build_shard/build-shard", pattern=r"^[^/]+/[^/]+$",
        description="The deployment (FLOW/DEPLOYMENT) shards run as when `runner` is deployments.")
    shard_start_timeout_s: float = Field(
        600.0, gt=0,
        description="With `runner` deployments: how long a shard run may stay Scheduled, Late or Pending (no "
        "worker or `stepforge serve` has started it) before the build fails, naming the work pool and the "
        "deployment; the unstarted runs are cancelled and staged shards kept for a rerun.")

    @model_validator(mode="after")
    def _address_needs_a_cluster(self) -> "ConcurrencyConfig":
        if self.address is not None and self.runner in ("threads", "deployments"):
            raise CrossFieldError(f"`concurrency.address` names a Dask or Ray scheduler, but `concurrency.runner` is "
                                  f"{self.runner}: set `concurrency.runner=dask` (or ray), or drop the address.",
                                  "concurrency.address", "concurrency.runner")
        return self


# Sections that used to sit inside `search` and are now configured once, beside it.
_MOVED = {"budget": "enabled=true", "pairs": "sibling.enabled=false"}


class BuildConfig(BaseModel):
    """A dataset build: where problems come from, which policy and search label them, where it goes."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("demo", description="Dataset name; releases go to ROOT/DATASET/vN (e.g. ./stepforge-data/demo/v1).")
    source: SourceConfig = Field(default_factory=_default("source"), description="Where problems come from.")
    policy: PolicyConfig = Field(default_factory=_default("policy"), description="The model that writes steps.")
    search: SearchConfig = Field(default_factory=_default("search"), description="Search/labelling algorithm.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig,
                                 description="Probe-then-search budgeting, for whichever algorithm searches.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Pair makers run on every searched tree.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    verifier: VerifierConfig = Field(default_factory=_default("verifier"), description="Outcome verification.")
    checks: list[StepCheckConfig] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [ArithCheckConfig()],
        description="Step checks run on every step of every solution, in this order: `arith-check` (equations, "
        "SymPy), `code-check` (a step's Python in a sandbox). Their verdicts go to `steps.verdicts`; [] for none.")
    judge: JudgeSection = Field(default_factory=JudgeSection, description="The LLM-as-judge step verifier.")
    pseudo_gold: PseudoGoldConfig = Field(
        default_factory=PseudoGoldConfig, description="Majority-vote references for problems without a gold answer "
        "(`source.fields.answer: null`); problems that have one are never voted on.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Drop exact and near-duplicate problems "
                               "before search (off by default); every dropped one is listed in the manifest.")
    decontaminate: DecontamConfig = Field(
        default_factory=DecontamConfig, description="Drop problems found in benchmark files (n-gram overlap) before "
        "search; every dropped one is listed in the manifest with its benchmark match.")
    formal: FormalConfig = Field(default_factory=FormalConfig,
                                 description="Formal labels: every solution checked whole by Lean 4 (off by default).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    shard_size: int = Field(64, ge=1, le=4096, description="Problems per shard (one Prefect task each).")
    seed: int = Field(0, description="Build seed: every request's seed derives from it.")
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    rollout_cache: bool = Field(True, description="Reuse rollouts of equal prefixes across runs (SQLite beside the data).")

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, data: Any) -> Any:
        # `--set search.k=8` must mean "the default algorithm with k=8", not "an untagged union member".
        if isinstance(data, dict):
            data = dict(data)
            for section, (_, tag, default) in _PLUGINS.items():
                value = data.get(section)
                if isinstance(value, dict) and tag not in value:
                    data[section] = {tag: default, **value}
            search = data.get("search")
            for old, example in _MOVED.items():
                if isinstance(search, dict) and old in search:
                    raise CrossFieldError(f"`search.{old}` is now the top-level `{old}` section, configured once for "
                                          f"every algorithm: write `{old}.<field>`, e.g. `--set {old}.{example}`.",
                                          f"search.{old}", old)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "BuildConfig":
        # Checks between sections that need no run (no server, no file): the plug-ins' own rules.
        check = policies.BACKENDS[self.policy.kind].check_prompt
        if check is not None:
            check(self.policy, self.prompt)
        self._check_domain()
        if self.pairs.formal.enabled and not self.formal.enabled:
            raise CrossFieldError("`pairs.formal.enabled` makes pairs from Lean's whole-proof checks, which the `formal` "
                                  "section runs: set `formal.enabled=true` (and its `formal.lean` backend) too.",
                                  "pairs.formal.enabled", "formal.enabled")
        return self

    def _check_domain(self) -> None:
        """The source's problem domain decides what the outcome verifier is handed (`tasks/domains.py`): a
        verifier or a stand-in policy of another domain is refused here, before any work."""
        from tasks.domains import DOMAINS

        domain = sources.SOURCES[self.source.kind].domain
        accepted = DOMAINS[domain].verifiers
        if self.verifier.kind not in accepted:
            raise CrossFieldError(f"`source.kind={self.source.kind}` has {domain} problems, which `verifier.kind="
                                  f"{self.verifier.kind}` cannot check; set `verifier.kind={accepted[0]}`.",
                                  "verifier.kind", "source.kind")
        wants = policies.BACKENDS[self.policy.kind].domain
        if wants is not None and wants != domain:
            fit = [n for n, b in policies.BACKENDS.items() if b.domain == domain]
            raise CrossFieldError(f"`policy.kind={self.policy.kind}` writes {wants} solutions and `source.kind="
                                  f"{self.source.kind}` has {domain} problems; use "
                                  + (f"`policy.kind={fit[0]}` or " if fit else "") + "a real model.",
                                  "policy.kind", "source.kind")
        judge_domain = policies.JUDGE_BACKENDS[self.judge.policy.kind].domain
        if self.judge.enabled and judge_domain is not None and judge_domain != domain:
            raise CrossFieldError(f"`judge.policy.kind={self.judge.policy.kind}` reads {judge_domain} solutions and "
                                  f"`source.kind={self.source.kind}` has {domain} problems: set `judge.enabled=false` "
                                  "or give the judge a real model.", "judge.policy.kind", "source.kind")

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str) -> str:
        from storage.errors import StepforgeError
        from storage.names import reserved_reason
        from storage.objectstore import validate_name

        reason = reserved_reason(v)
        if reason is not None:  # before the syntax check, which would only say "must start with a letter"
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("reserved_name", "{reason}; choose another name", {"reason": reason})
        try:
            validate_name(v)
        except StepforgeError as exc:  # re-raised as a validation error so the field path is reported
            raise ValueError(str(exc)) from None
        return v

    def build_key(self) -> str:
        """Hash of everything that changes the data (not where it goes, not how fast)."""
        content = self.model_dump(mode="json", exclude={"storage": True, "concurrency": True,
                                                         "rollout_cache": True, "dataset": True})
        # Where and how fast the policy runs is not content; each backend config names its own such fields.
        for noise in ("latency_s", "max_concurrency", "max_batch", *getattr(self.policy, "noise_fields", ())):
            content["policy"].pop(noise, None)
        content["verifier"].pop("workers", None)
        for noise in LEAN_NOISE_FIELDS if isinstance(content["verifier"].get("lean"), dict) else ():
            content["verifier"]["lean"].pop(noise, None)
        for check in content["checks"]:
            check.pop("workers", None)
        judge_policy = content["judge"]["policy"]
        for noise in ("latency_s", "max_concurrency", "max_batch", *getattr(self.judge.policy, "noise_fields", ())):
            judge_policy.pop(noise, None)
        if not self.pairs.formal.enabled:  # as `formal` below: off, it is not content
            content["pairs"].pop("formal")
        # Formal labels off: the section is not content at all, so builds keep the keys they had before it.
        if not self.formal.enabled:
            content.pop("formal")
        else:
            for noise in LEAN_NOISE_FIELDS:
                content["formal"]["lean"].pop(noise, None)
        return content_id("build", content)[:20]


def _field_path(loc: tuple[Any, ...]) -> str:
    # A tagged union puts the tag value after the section (`search.omegaprm.k`); users never typed it.
    if len(loc) > 1 and loc[0] in _PLUGINS and loc[1] in _PLUGINS[loc[0]][0]:
        loc = (loc[0], *loc[2:])
    # The same inside the list of step checks (`checks.0.code-check.timeout_s`) and the judge's model.
    nested = ({v.name for v in verifiers.step_checks()} if loc[:1] == ("checks",)
              else set(policies.JUDGE_BACKENDS) if loc[:2] == ("judge", "policy") else set())
    if len(loc) > 2 and loc[2] in nested:
        loc = (*loc[:2], *loc[3:])
    # And the Lean backend of `formal.lean` / `verifier.lean` (`formal.lean.kimina.base_url`).
    from verifiers.lean import BACKENDS as LEAN_BACKENDS

    if len(loc) > 2 and loc[0] in ("formal", "verifier") and loc[1] == "lean" and loc[2] in LEAN_BACKENDS:
        loc = (*loc[:2], *loc[3:])
    return ".".join(str(p) for p in loc) or "config"


_UNECHOED = ("url", "key", "token", "secret", "password", "credential", "extra_body")


def config_error(exc: ValidationError) -> ConfigError:
    lines = []
    first = None
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, CrossFieldError):  # its message names every field at fault
            first = first or cause.fields[0]
            lines.append(str(cause))
            continue
        path = _field_path(tuple(err["loc"]))
        first = first or path
        got = err.get("input")
        # URLs and anything key-like are never echoed: a mistyped value may hold a credential.
        hidden = any(part in path.lower() for part in _UNECHOED)
        shown = ("" if hidden or isinstance(got, (dict, list)) or got is None or repr(got) in err["msg"]
                 else f", got {got!r}")
        lines.append(f"`{path}`: {err['msg']}{shown}")
    return ConfigError("Invalid build config: " + "; ".join(lines), field=first)


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 8 -> int, true -> bool, s3://x -> str."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"`--set {assignment}`: expected FIELD=VALUE, e.g. --set search.k=8", field=assignment)
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    cur = data
    for key in keys[:-1]:
        nxt = cur.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"`--set {path}`: `{key}` is not a section", field=path)
        cur = nxt
    cur[keys[-1]] = parse_value(raw)


def _invalid_text(data: Any, path: str = "") -> tuple[str, int] | None:
    """(dotted field, character index) of the first string no UTF-8 encoder takes (YAML's "\\ud800", a shell
    argument of undecodable bytes): it would fail later, in a request to the Prefect API or the manifest."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path or "config", exc.start
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _invalid_text(key, path or "config") if isinstance(key, str) else None
        found = found or _invalid_text(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML config file (or nothing) with `--set` overrides applied, checked to be a mapping of valid text,
    not yet validated: what every `stepforge` command's config model is built from."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {str(p)!r} does not exist.", field="--config", value=str(p))
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {exc}", field="--config") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(p)!r} must hold a mapping at the top level.", field="--config")
        data = loaded
    for assignment in overrides or []:
        apply_override(data, assignment)
    bad = _invalid_text(data)
    if bad is not None:
        raise ConfigError(f"`{bad[0]}` is not valid Unicode text: it holds a lone surrogate at character {bad[1]} "
                          f"(a `\\udXXX` escape or undecodable bytes); the config is stored as UTF-8.", field=bad[0])
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BuildConfig:
    data = config_data(path, overrides)
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc) from None
