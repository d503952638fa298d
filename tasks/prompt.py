"""Prompt rendering: a Jinja template for the question plus the step prefix written by `StepFormat`."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import jinja2
from pydantic import BaseModel, ConfigDict, Field

from tasks.segment import StepFormat

DEFAULT_TEMPLATE = "Question: {{ question }}\nAnswer:\n{{ steps }}"


class PromptConfig(BaseModel):
    """How a node becomes a prompt. The template is stored in the manifest with the rest of the config."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(
        DEFAULT_TEMPLATE,
        description="Jinja template with `question` and `steps` (the prefix already rendered by the step "
        "format); the prefix must come last so each child prompt extends its parent's prompt.",
    )
    step_format: StepFormat = Field(default_factory=StepFormat)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(template)


def render_prompt(cfg: PromptConfig, question: str, steps: Sequence[str]) -> str:
    return _compile(cfg.template).render(question=question, steps=cfg.step_format.render(steps))
