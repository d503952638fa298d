"""The verifier protocol: every verifier returns one `Verdict` per item, never raises for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, Sequence, runtime_checkable


class Status(str, Enum):
    VALID = "valid"
    INVALID = "invalid"
    ERROR = "error"  # the verifier could not decide (parse failure, crash): never counted as wrong
    TIMEOUT = "timeout"  # the verifier ran out of time: never counted as wrong
    NONE = "none"  # nothing to check (a step without equations or code): neither right nor wrong

    @property
    def decided(self) -> bool:
        # Identity, not `in (...)`: members of a str Enum compare by string equality (called per verdict).
        return self is Status.VALID or self is Status.INVALID


@dataclass(frozen=True)
class Verdict:
    verifier: str
    version: str
    status: Status
    score: float | None = None
    detail: str = ""  # what a reader needs to know about the decision (human-readable, not parsed)
    answer: str | None = None  # the final answer the verifier extracted from the item, None when it found none

    @property
    def is_valid(self) -> bool:
        return self.status is Status.VALID

    def to_row(self) -> dict[str, Any]:
        """The `verdicts` struct of the nodes table (the extracted answer has its own column, `final_answer`)."""
        return {"verifier": self.verifier, "version": self.version, "status": self.status.value,
                "score": self.score, "detail": self.detail}


@dataclass(frozen=True)
class OutcomeItem:
    """A completion to check against a gold answer."""

    completion: str
    gold: str


@dataclass(frozen=True)
class StepItem:
    """One step of a solution, for verifiers that check a step on its own (arithmetic, code)."""

    text: str


@dataclass(frozen=True)
class SolutionItem:
    """A whole solution, for verifiers that judge steps in context (the LLM judge)."""

    question: str
    steps: tuple[str, ...]


@runtime_checkable
class Verifier(Protocol):
    name: str
    version: str

    async def verify(self, batch: Sequence[Any]) -> list[Verdict]: ...

    async def aclose(self) -> None: ...

    # Optional `verify_now(batch) -> list[Verdict | None]`: the verdicts the verifier can give at once, in the
    # calling thread and without I/O (a fast path), None for the items only `verify` can decide. A verdict given
    # here is exactly what `verify` would give for the item; the engine then batches only the rest.
