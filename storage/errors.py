"""One error tree for the whole project. Each error names the record or field at fault and what to do."""

from __future__ import annotations

from typing import Any


class StepforgeError(Exception):
    """Base of every error stepforge raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class ConfigError(StepforgeError):
    """A configuration value is invalid; raised before any work starts."""


class SourceError(StepforgeError):
    """A problem source cannot be read at all (a single bad record is quarantined instead)."""


class PolicyError(StepforgeError):
    """The policy backend failed in a way retries cannot fix (server down, circuit open)."""


class StorageError(StepforgeError):
    """An object-store, release or catalog operation failed."""


class IntegrityError(StorageError):
    """A release's files do not match its manifest."""


class BrokenReleaseError(IntegrityError):
    """A visible release cannot be used: its manifest is unreadable or its files differ from it.

    Carries the release and the reason, so callers that walk a whole root (catalog sync, ``datasets
    list``) can report it in one line and leave it out instead of failing."""

    def __init__(self, dataset: str, version: int, reason: str) -> None:
        self.dataset = dataset
        self.version = version
        self.reason = reason
        super().__init__(f"{dataset}@v{version} is damaged ({reason}); run `stepforge datasets verify "
                         f"{dataset}@v{version}` for details.", field="release", value=f"{dataset}@v{version}")


class CrossFieldError(ValueError):
    """Raised inside a config validator when two or more fields disagree. A ValueError, so pydantic reports
    it like any validation error; `fields` (dotted, e.g. `policy.endpoint`, `prompt.family`) lets the error
    name the fields at fault instead of the section the validator sits on."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields
