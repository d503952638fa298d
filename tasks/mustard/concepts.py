"""Concept seeds: the shipped list of math concepts by educational level (`concepts.yaml`), or a user's file
of the same shape, expanded into the seeds of a run (each concept × `samples_per_concept`)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import ConfigError, SourceError


class Concept(BaseModel):
    """One seed concept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                    description="Stable identifier: record ids and request seeds derive from it.")
    level: str = Field(..., min_length=1, description="Educational level, e.g. `middle school`.")
    concept: str = Field(..., min_length=1, description="The concept the problem must use.")


@dataclass(frozen=True)
class Seed:
    """One generation: a concept and its sample index (`seed_id` = `<concept id>#<index>`)."""

    concept: Concept
    index: int

    @property
    def seed_id(self) -> str:
        return f"{self.concept.id}#{self.index}"


def shipped_concepts_text() -> str:
    return resources.files("tasks.mustard").joinpath("concepts.yaml").read_text(encoding="utf-8")


def load_concepts(path: str | None = None, levels: Sequence[str] = ()) -> list[Concept]:
    """The concepts of `path` (the shipped list when None), those of `levels` only when given. A bad file is a
    `SourceError` naming the entry and field; an unknown level a `ConfigError` listing the known ones."""
    where = "the shipped concepts.yaml" if path is None else repr(path)
    if path is None:
        text = shipped_concepts_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"`concepts_path`: no file {path!r}; give a YAML or JSON file with a `concepts` list.",
                              field="concepts_path", value=path)
        text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise SourceError(f"{where} is not valid YAML/JSON: {exc}", field="concepts_path") from None
    raw = data.get("concepts") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise SourceError(f"{where} must hold a non-empty list under `concepts`.", field="concepts_path")
    concepts: list[Concept] = []
    for i, entry in enumerate(raw):
        try:
            concepts.append(Concept.model_validate(entry))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "entry"
            raise SourceError(f"{where}: concept {i + 1}: field `{field}`: {err['msg']}",
                              field="concepts_path") from None
    seen: dict[str, int] = {}
    for i, c in enumerate(concepts):
        if c.id in seen:
            raise SourceError(f"{where}: concept {i + 1}: field `id`: {c.id!r} is already the id of concept "
                              f"{seen[c.id] + 1}; ids must be unique.", field="concepts_path")
        seen[c.id] = i
    if levels:
        known = sorted({c.level for c in concepts})
        unknown = [lv for lv in levels if lv not in known]
        if unknown:
            raise ConfigError(f"`levels`: {unknown} not among the levels of {where}: {known}.", field="levels",
                              value=list(levels))
        concepts = [c for c in concepts if c.level in levels]
    return concepts


def expand_seeds(concepts: Sequence[Concept], samples_per_concept: int) -> list[Seed]:
    """Every (concept, sample) of a run, concept by concept in file order."""
    return [Seed(c, i) for c in concepts for i in range(samples_per_concept)]
