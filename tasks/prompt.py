"""Prompt configuration: Jinja templates per model family, plus the step prefix written by `StepFormat`.
The rendering itself is `storage.render.PromptLayout`, shared with the exports.

Two families:
- `completion`: one template with `question` and `steps` (plain, or `Step i:` few-shot), sent as is.
- `chat`: a user message rendered from `template`, the steps as the start of the assistant's reply, both
  put through a chat template (ChatML by default, or a tokenizer's own `chat_template`: from a loaded
  tokenizer with `prompt_config_from_tokenizer`, or from a saved one with `prompt.chat_template_from:
  <folder>`), and the reply left open so the model continues it.

In both families the steps prefix comes last, so a child's prompt is its parent's prompt plus one step;
that is what lets backends extend token IDs and servers hit their prefix cache. Packaged templates live in
`tasks/templates/*.jinja`; the text actually used is kept in the config and so in the manifest.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jinja2
from pydantic import ConfigDict, Field, model_validator

from storage.render import DEFAULT_TEMPLATE, PromptLayout, compile_template, render_chat

__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_CHAT_TEMPLATE", "PromptConfig", "render_prompt", "render_chat",
           "chatml_to_messages", "load_template", "packaged_templates", "prompt_config_from_tokenizer",
           "read_tokenizer_chat_template"]

DEFAULT_CHAT_TEMPLATE = "chatml"


def packaged_templates() -> list[str]:
    return sorted(p.name.removesuffix(".jinja") for p in resources.files("tasks.templates").iterdir()
                  if p.name.endswith(".jinja"))


def read_tokenizer_chat_template(folder: str) -> tuple[str, str, str]:
    """(chat template, bos_token, eos_token) of a tokenizer saved with `save_pretrained`, read from its files
    (no transformers import): `chat_template.jinja` (transformers >= 4.47) or `tokenizer_config.json`'s
    `chat_template` (a string, or a list of named templates of which `default` is used)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"`prompt.chat_template_from` must be a local tokenizer folder (as written by "
                         f"`save_pretrained`), got {folder!r}; download the tokenizer first, e.g. "
                         f"`huggingface-cli download <repo> --include 'tokenizer*' 'chat_template*'`")

    def load_json(name: str) -> dict[str, Any]:
        f = path / name
        try:
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except ValueError as exc:
            raise ValueError(f"`prompt.chat_template_from`: {f} is not valid JSON: {exc}") from None

    config = load_json("tokenizer_config.json")
    template = config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"`prompt.chat_template_from`: no chat template in {str(path)!r} (neither "
                         "chat_template.jinja nor `chat_template` in tokenizer_config.json); use "
                         "`prompt.chat_template_name` or the completion family")
    special = load_json("special_tokens_map.json")

    def token(name: str) -> str:
        value = config.get(name, special.get(name))
        if isinstance(value, dict):  # an AddedToken written as {"content": ..., ...}
            value = value.get("content")
        return value if isinstance(value, str) else ""

    return template, token("bos_token"), token("eos_token")


def load_template(name: str) -> str:
    path = resources.files("tasks.templates").joinpath(f"{name}.jinja")
    if not path.is_file():
        raise ValueError(f"no packaged template {name!r}; choose one of {packaged_templates()} "
                         "or give the Jinja text itself")
    return path.read_text(encoding="utf-8")


class PromptConfig(PromptLayout):
    """How a node becomes a prompt. The template text is kept here, so the manifest records it; rendering is
    `PromptLayout.render` (storage/render.py), the same code exports use."""

    model_config = ConfigDict(extra="forbid")

    template_name: str | None = Field(
        None, description="A packaged template (tasks/templates/NAME.jinja: plain, fewshot-steps, chat-user); "
        "its text fills `template`.",
    )
    chat_template_name: str | None = Field(
        None, description="A packaged chat template (e.g. `chatml`); default `chatml` for the chat family.")
    chat_template_from: str | None = Field(
        None, exclude=True,
        description="A local tokenizer folder whose chat template (and bos/eos tokens) to use; implies the chat "
        "family. Read once at validation into `chat_template`, `bos_token` and `eos_token`, which the manifest "
        "records; the folder path itself is not recorded (moving the folder changes nothing).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_packaged(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        folder = data.get("chat_template_from")
        if folder:
            if data.get("family", "chat") != "chat":
                raise ValueError("`prompt.chat_template_from` needs `prompt.family=chat` (or leave family unset)")
            if data.get("chat_template_name"):
                raise ValueError("`prompt.chat_template_from` and `prompt.chat_template_name` both name a chat "
                                 "template; set only one of them")
            template, bos, eos = read_tokenizer_chat_template(str(folder))
            # What was read fills the fields; values given as well must agree (never silently replaced).
            for key, value in (("chat_template", template), ("bos_token", bos), ("eos_token", eos)):
                given = data.get(key)
                if given not in (None, value):
                    raise ValueError(f"`prompt.{key}` disagrees with the tokenizer in `prompt.chat_template_from` "
                                     f"({str(folder)!r}); set only one of them")
                data[key] = value
            data["family"] = "chat"
        if data.get("family") == "chat":  # chat defaults: ChatML layout, a user message without `steps`
            if not data.get("chat_template") and not data.get("chat_template_name"):
                data["chat_template_name"] = DEFAULT_CHAT_TEMPLATE
            if data.get("template") in (None, DEFAULT_TEMPLATE) and not data.get("template_name"):
                data["template_name"] = "chat-user"
        for name_key, text_key in (("template_name", "template"), ("chat_template_name", "chat_template")):
            name = data.get(name_key)
            if not name:
                continue
            text = load_template(name)
            given = data.get(text_key)
            default = DEFAULT_TEMPLATE if text_key == "template" else None
            if given not in (None, default, text):
                raise ValueError(f"`prompt.{name_key}` ({name!r}) and `prompt.{text_key}` disagree; "
                                 f"set only one of them")
            data[text_key] = text
        return data

    @model_validator(mode="after")
    def _check(self) -> "PromptConfig":
        for key in ("template", "chat_template"):
            text = getattr(self, key)
            if text is not None:
                try:
                    compile_template(text)
                except jinja2.TemplateSyntaxError as exc:
                    raise ValueError(f"`prompt.{key}` is not valid Jinja: {exc}") from None
        if self.family == "completion" and self.chat_template is not None:
            raise ValueError("`prompt.chat_template` is only used with `prompt.family=chat`")
        if self.family == "completion" and "steps" not in self.template:
            raise ValueError("`prompt.template` of the completion family must place `{{ steps }}` (last)")
        return self



def render_prompt(cfg: PromptLayout, question: str, steps: Sequence[str]) -> str:
    """The prompt of a node whose stored steps are `steps`, rendered canonically (`PromptLayout.prompt`)."""
    return cfg.prompt(question, steps)


_CHATML_RE = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(<\|im_end\|>\n?|\Z)", re.DOTALL)


def chatml_to_messages(prompt: str) -> tuple[list[dict[str, str]], bool]:
    """Invert a ChatML rendering: (messages, whether the last assistant message is left open to continue).

    The OpenAI chat endpoint takes messages, not text, while the engine hands backends prompt text; ChatML
    is the one layout that can be read back without knowing the question. Other chat templates go through
    `/v1/completions` with the prompt rendered here.
    """
    messages: list[dict[str, str]] = []
    pos = 0
    open_reply = False
    for m in _CHATML_RE.finditer(prompt):
        if prompt[pos : m.start()].strip():
            break
        messages.append({"role": m.group(1), "content": m.group(2)})
        open_reply = not m.group(3)
        pos = m.end()
    if not messages or prompt[pos:].strip():
        raise ValueError("`policy.endpoint=chat` needs prompts rendered with the ChatML chat template "
                         "(`prompt.family=chat`, `prompt.chat_template_name=chatml`); use `endpoint=completions` "
                         "for other templates")
    if open_reply and messages[-1]["role"] != "assistant":
        raise ValueError("a ChatML prompt may only leave an assistant message open")
    if not open_reply:
        pass  # the request asks for a fresh reply (generation prompt), which the server adds itself
    elif messages[-1]["role"] == "assistant" and messages[-1]["content"] == "":
        messages.pop()  # an empty open reply is just the generation prompt
        open_reply = False
    return messages, open_reply


def prompt_config_from_tokenizer(tokenizer: Any, **changes: Any) -> PromptConfig:
    """A chat-family config that uses the tokenizer's own chat template and special tokens."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no `chat_template`; use the completion family or `chat_template_name`")
    return PromptConfig(family="chat", template_name=changes.pop("template_name", "chat-user"),
                        chat_template=template, bos_token=tokenizer.bos_token or "",
                        eos_token=tokenizer.eos_token or "", **changes)
