"""`MustardConfig`: the MUSTARD-style generation flow's one model (CLI config file, flow parameter, UI form),
and the live objects it makes (author model, Lean verifier, templates) with the preflight `verify_mustard`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.config import config_data, config_error
from storage.errors import ConfigError, CrossFieldError, StepforgeError
from storage.objectstore import StorageConfig
from storage.schema import content_id
from tasks.mustard.concepts import Concept, Seed, expand_seeds, load_concepts
from tasks.mustard.pipeline import LoopSettings
from tasks.policy.base import Policy
from tasks.policy.hf_transformers import TransformersPolicyConfig
from tasks.policy.openai_compat import OpenAIPolicyConfig
from tasks.policy.registry import BACKENDS
from tasks.policy.simulated_author import SimulatedAuthor, SimulatedAuthorConfig
from tasks.policy.simulated_author import policy_id as simulated_author_id
from tasks.policy.vllm_offline import VLLMPolicyConfig
from tasks.prompt import PromptConfig, load_template
from verifiers.lean import LeanCodeConfig, LeanReplConfig, make_lean_verifier

# The author model: the flow's simulated author, or any policy backend that serves a real model.
AuthorConfig = Annotated[
    Union[SimulatedAuthorConfig, OpenAIPolicyConfig, TransformersPolicyConfig, VLLMPolicyConfig],
    Field(discriminator="kind"),
]


STANDIN_MODULE = "verifiers.lean.testing.repl_server"
STANDIN_CHECKER = "lean-standin"  # the checker name of a release the stand-in checked: never `lean-repl`


def standin_repl_command() -> list[str]:
    """The stand-in Lean REPL (not Lean: a checker of a stated fragment) run by this Python."""
    return [sys.executable, "-m", STANDIN_MODULE]


def standin_args(lean: Any) -> list[str] | None:
    """The stand-in's own arguments (`--seed 7`) when `lean` runs the stand-in REPL; None for anything else
    (a real REPL, Kimina). The stand-in is recognised by its module, whichever Python runs it."""
    command = getattr(lean, "command", None) if getattr(lean, "kind", None) == "repl" else None
    if not command:
        return None
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == STANDIN_MODULE:
            return list(command[i + 2:])
    return None


def _default_lean() -> LeanReplConfig:
    return LeanReplConfig(command=standin_repl_command(), max_repls=2)


class MustardConcurrency(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shards: int = Field(2, ge=1, description="Shard tasks running at once.")
    lean_slots: str | None = Field(
        None, min_length=1,
        description="Name of a Prefect global concurrency limit (`prefect gcl create NAME --limit N`) of which "
        "every batch of proofs sent to Lean holds one slot while Lean checks it, so every run sharing one Lean "
        "server cluster (builds with a `formal` section too) stays within N batches at once. None: no limit "
        "beyond the Lean backend's own.")


class MustardConfig(BaseModel):
    """MUSTARD-style generation: concept seeds, an author model writing problem + informal proof + Lean proof,
    Lean checking, up to `max_revisions` revisions with Lean's messages, passing records committed."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("mustard", description="Dataset name; releases go to ROOT/DATASET/vN.")
    concepts_path: str | None = Field(None, description="YAML or JSON file with a `concepts` list of {id, level, "
                                      "concept}; None: the shipped list (tasks/mustard/concepts.yaml).")
    levels: list[str] = Field(default_factory=list, description="Only concepts of these educational levels; "
                              "empty: all.")
    samples_per_concept: int = Field(4, ge=1, le=100_000, description="Problems asked for per concept (seeds = "
                                     "concepts x samples).")
    max_revisions: int = Field(2, ge=0, le=16, description="Revisions of a proof Lean rejected, each with Lean's "
                               "messages in the prompt (R); 0: one attempt per seed.")
    author: AuthorConfig = Field(default_factory=SimulatedAuthorConfig,
                                 description="The author model: `simulated-author` (default, a stand-in that "
                                 "knows the shipped concepts), or `openai` / `transformers` / `vllm`.")
    lean: LeanCodeConfig = Field(default_factory=_default_lean,
                                 description="The Lean backend. Absent: the stand-in REPL (not Lean; a release "
                                 "it checks says so). `repl`: a real REPL, `lean.command` (default `lake env repl`) "
                                 "run in `lean.cwd`; or `kimina`.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of the author.")
    max_tokens: int = Field(2048, ge=1, description="Token limit per answer.")
    header: str = Field("import Mathlib", min_length=1, description="Imports checked with a Lean block that has "
                        "none of its own.")
    author_template: str = Field("mustard-author", description="Prompt template of a first attempt: a packaged "
                                 "name (tasks/templates) or a .jinja file; gets `concept` and `level`.")
    revise_template: str = Field("mustard-revise", description="Prompt template of a revision: a packaged name or "
                                 "a .jinja file; gets `concept`, `level`, `previous` and `feedback`.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    shard_size: int = Field(32, ge=1, le=4096, description="Seeds per shard (one Prefect task each).")
    seed: int = Field(0, description="Build seed: every request's seed derives from it.")
    concurrency: MustardConcurrency = Field(default_factory=MustardConcurrency)

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, data: Any) -> Any:
        # `--set author.mistake_rate=0.3` means the default author with that rate. A `lean` section without a
        # kind is a REPL, and a REPL without a command is the real one's default (`lake env repl`), as in a
        # build: only a config with no `lean` section at all gets the stand-in, so a run meant for Lean never
        # silently becomes a stand-in run.
        if isinstance(data, dict):
            data = dict(data)
            for section, tag in (("author", "simulated-author"), ("lean", "repl")):
                value = data.get(section)
                if isinstance(value, dict) and "kind" not in value:
                    data[section] = {"kind": tag, **value}
        return data

    @model_validator(mode="after")
    def _concepts_fit_in_a_shard(self) -> "MustardConfig":
        # Shards are generated apart: a concept split across two could repeat a problem in both, and the
        # release would get two `problems` rows of one problem_id. Keeping every concept in one shard rules
        # that out (each shard's `problems` table already holds a problem once).
        if self.samples_per_concept > self.shard_size:
            raise CrossFieldError(
                f"`samples_per_concept` ({self.samples_per_concept}) is more than `shard_size` ({self.shard_size}): "
                "a concept's seeds must fit in one shard, or a problem repeated in two shards would be two "
                "`problems` rows; set `shard_size` to at least `samples_per_concept`.",
                "samples_per_concept", "shard_size")
        return self

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str) -> str:
        from storage.names import reserved_reason
        from storage.objectstore import validate_name

        reason = reserved_reason(v)
        if reason is not None:
            raise ValueError(f"{reason}; choose another name")
        try:
            validate_name(v)
        except StepforgeError as exc:
            raise ValueError(str(exc)) from None
        return v

    def build_key(self) -> str:
        """Hash of everything that changes the data (not where it goes, not how fast): the templates' text,
        not their names (shards read the files, so an edited template must not resume old shards), and the
        stand-in's arguments, not the path of the Python that runs it (the key is the same on every machine).
        Raises `ConfigError` when a template cannot be read."""
        from tasks.formal import LEAN_NOISE_FIELDS

        content = self.model_dump(mode="json", exclude={"storage": True, "concurrency": True, "dataset": True})
        for noise in ("latency_s", "max_concurrency", "max_batch", *getattr(self.author, "noise_fields", ())):
            content["author"].pop(noise, None)
        for noise in LEAN_NOISE_FIELDS:
            content["lean"].pop(noise, None)
        args = standin_args(self.lean)
        if args is not None:
            content["lean"]["command"] = [STANDIN_CHECKER, *args]
        for field in ("author_template", "revise_template"):
            content[field] = template_text(getattr(self, field), field)
        return content_id("mustard-build", content)[:20]


def load_mustard_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MustardConfig:
    data = config_data(path, overrides)
    try:
        return MustardConfig.model_validate(data)
    except ValidationError as exc:
        err = config_error(exc)
        raise ConfigError(str(err).replace("Invalid build config", "Invalid mustard config", 1),
                          field=err.field) from None


# --- config -> live objects --------------------------------------------------------------------------------


def concepts(cfg: MustardConfig) -> list[Concept]:
    return load_concepts(cfg.concepts_path, cfg.levels)


def seeds(cfg: MustardConfig) -> list[Seed]:
    return expand_seeds(concepts(cfg), cfg.samples_per_concept)


def template_text(name: str, field: str) -> str:
    """A packaged template name, or the path of a .jinja file."""
    path = Path(name)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise ConfigError(f"`{field}`: no file {name!r}; give a packaged template name or the path of a .jinja "
                              "file.", field=field, value=name)
        return path.read_text(encoding="utf-8")
    try:
        return load_template(name)
    except ValueError as exc:
        raise ConfigError(f"`{field}`: {exc}", field=field, value=name) from None


def compile_checked(text: str, field: str) -> None:
    """A template that does not compile fails the preflight, naming its field, not every shard later."""
    import jinja2

    from storage.render import compile_template

    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"`{field}`: the template does not compile (line {exc.lineno}: {exc.message}).",
                          field=field) from None


def settings(cfg: MustardConfig) -> LoopSettings:
    return LoopSettings(cfg.max_revisions, cfg.temperature, cfg.max_tokens, cfg.header, cfg.seed,
                        template_text(cfg.author_template, "author_template"),
                        template_text(cfg.revise_template, "revise_template"))


def author_id(cfg: MustardConfig) -> str:
    if isinstance(cfg.author, SimulatedAuthorConfig):
        return simulated_author_id(cfg.author)
    return BACKENDS[cfg.author.kind].identity(cfg.author)


def make_author(cfg: MustardConfig) -> Policy:
    if isinstance(cfg.author, SimulatedAuthorConfig):
        return SimulatedAuthor(cfg.author)  # type: ignore[return-value]
    return BACKENDS[cfg.author.kind].factory(cfg.author, PromptConfig())


def checker_name(cfg: MustardConfig) -> str:
    """The checker a release names (manifest `verifier`, card, every verdict): `lean-standin` for the stand-in
    REPL, never the name of a real Lean backend."""
    if standin_args(cfg.lean) is not None:
        return STANDIN_CHECKER
    return {"repl": "lean-repl", "kimina": "lean-kimina"}.get(cfg.lean.kind, cfg.lean.kind)


def make_checker(cfg: MustardConfig) -> Any:
    checker = make_lean_verifier(cfg.lean)
    if standin_args(cfg.lean) is not None:
        checker.name = STANDIN_CHECKER  # the verdicts in the rows say who checked them
    return checker


def verify_mustard(cfg: MustardConfig) -> int:
    """Checks against the run before any work (and before the Prefect server starts): the concepts file and
    templates read and compile, the author's key is set, the Lean REPL's command can start (or Kimina's key
    is set). Returns the number of seeds."""
    n = len(seeds(cfg))
    for field in ("author_template", "revise_template"):
        compile_checked(template_text(getattr(cfg, field), field), field)
    backend = BACKENDS.get(cfg.author.kind)
    if backend is not None and backend.check_environment is not None:
        backend.check_environment(cfg.author)
    from verifiers.lean.environment import check_lean_environment

    check_lean_environment(cfg.lean, "lean")  # the build's check: a REPL that cannot start, a key not set
    return n
