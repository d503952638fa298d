"""Step segmentation with character offsets, and the one `StepFormat` that prompts, stop strings and the
segmenter all read, so generation and segmentation can never disagree."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_LABEL_RE = re.compile(r"^\s*Step\s*\d+\s*[:.]\s*", re.IGNORECASE)
_STEP_HEAD_RE = re.compile(r"(?:^|\n)\s*Step\s*\d+\s*[:.]\s*", re.IGNORECASE)


class StepFormat(BaseModel):
    """How steps are written and split."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["separator", "step-label"] = Field(
        "separator",
        description="`separator`: steps are split on `separator`. `step-label`: a new step starts at each "
        "`Step i:` label wherever it appears (separators may vary).",
    )
    separator: str = Field("\n", description="Text between two steps, e.g. '\\n' or '\\n\\n'.")
    label: str | None = Field(
        "Step {i}: ", description="Prefix written before step i (1-based); `None` for unlabelled steps."
    )

    @field_validator("separator")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("`step_format.separator` must be a non-empty string, e.g. '\\n'.")
        return v

    @model_validator(mode="after")
    def _label_matches_mode(self) -> "StepFormat":
        # In step-label mode the label is the only step boundary: a label the segmenter cannot find would
        # silently turn every solution into one step.
        if self.mode == "step-label":
            try:
                sample = self.label.format(i=1) if self.label else ""
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"`step_format.label` may use only the placeholder {{i}} (the 1-based step "
                                 f"number), got {self.label!r}") from None
            if not _STEP_HEAD_RE.match(sample):
                raise ValueError(
                    "`step_format.mode=step-label` needs a `label` with a `Step {i}:`-style head (e.g. "
                    f"'Step {{i}}: '), got {self.label!r}; use `mode=separator` for unlabelled steps.")
        return self

    def render_step(self, index: int, text: str) -> str:
        """Step `index` (0-based) as it appears in a solution, separator included."""
        head = self.label.format(i=index + 1) if self.label else ""
        return f"{head}{text}{self.separator}"

    def render(self, steps: Sequence[str], start: int = 0) -> str:
        return "".join(self.render_step(start + i, s) for i, s in enumerate(steps))

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end generation after exactly one step."""
        return (self.separator,)


@dataclass(frozen=True)
class Segment:
    text: str
    start: int  # offsets of `text` inside the segmented string: text == source[start:end]
    end: int


def segment(text: str, fmt: StepFormat) -> list[Segment]:
    """Split a solution into steps, dropping labels and blank pieces but keeping exact offsets."""
    if fmt.mode == "step-label":
        heads = list(_STEP_HEAD_RE.finditer(text))
        if not heads:
            return _strip_piece(text, 0, len(text))
        out: list[Segment] = []
        lead = text[: heads[0].start()]
        out += _strip_piece(lead, 0, len(lead))
        for j, m in enumerate(heads):
            end = heads[j + 1].start() if j + 1 < len(heads) else len(text)
            out += _strip_piece(text[m.end() : end], m.end(), end)
        return out
    out = []
    pos = 0
    while pos <= len(text):
        nxt = text.find(fmt.separator, pos)
        end = len(text) if nxt < 0 else nxt
        out += _strip_piece(text[pos:end], pos, end, strip_label=True)
        if nxt < 0:
            break
        pos = nxt + len(fmt.separator)
    return out


def _strip_piece(piece: str, start: int, end: int, strip_label: bool = False) -> list[Segment]:
    if strip_label:
        m = _LABEL_RE.match(piece)
        if m:
            start += m.end()
            piece = piece[m.end() :]
    lead = len(piece) - len(piece.lstrip())
    piece = piece.strip()
    if not piece:
        return []
    return [Segment(piece, start + lead, start + lead + len(piece))]
