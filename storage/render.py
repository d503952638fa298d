"""The rendering contract: how steps are written, split and located, and how a node becomes a prompt.

Everything that turns steps into text lives here, at the bottom layer, so the build (`tasks/`) and the
exports (`storage/exports/`) render with the same code and can never disagree:

- `StepFormat`: the one step format that prompts, stop strings and the segmenter all read.
- `segment`: a generated text split into steps, each with its offsets and the exact text the model wrote
  for it (`Segment.generated`), so prefixes sent back to the policy are byte-for-byte its own output.
- `StepFormat.render` / `StepFormat.spans`: the canonical rendering of stored steps and the character
  offsets of each step in it (the `steps` table's `char_start`/`char_end`).
- `PromptLayout`: the template fields of a prompt (what a manifest's `config.prompt` records) and the
  rendering of a question plus a steps prefix; `tasks.prompt.PromptConfig` extends it with the build-time
  conveniences (packaged template names, a tokenizer folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.errors import StorageError

__all__ = ["DEFAULT_TEMPLATE", "StepFormat", "Segment", "segment", "PromptLayout", "compile_template", "render_chat"]

DEFAULT_TEMPLATE = "Question: {{ question }}\nAnswer:\n{{ steps }}"

_LABEL_RE = re.compile(r"^\s*Step\s*\d+\s*[:.]\s*", re.IGNORECASE)
# A line that is no step (for separator "\n"): blank, or a `_LABEL_RE` label and blanks only. `[^\S\n]` is `\s`
# without the newline, so a match never leaves its line; `re`'s `\s` and `str.strip` agree on what is blank.
_NO_STEP_LINE_RE = re.compile(r"^[^\S\n]*(?:Step[^\S\n]*\d+[^\S\n]*[:.][^\S\n]*)?$", re.IGNORECASE | re.MULTILINE)
_STEP_HEAD_RE = re.compile(r"(?:^|\n)\s*Step\s*\d+\s*[:.]\s*", re.IGNORECASE)
# Stands in for the assistant's reply while the chat template renders, then is cut off: the prefix is
# appended verbatim, so no template can trim or escape it (HF's `continue_final_message` strips it).
_SENTINEL = "\x00STEPFORGE_PREFIX\x00"


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
        "Step {i}: ", description="Prefix written before step i (1-based); `None` for unlabelled steps (or steps "
        "whose `Step i:` heads the model writes itself: stored steps drop them, prompts keep them as written).")

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

    def head(self, index: int) -> str:
        """The label written before step `index` (0-based); empty for unlabelled steps."""
        return self.label.format(i=index + 1) if self.label else ""

    def render_step(self, index: int, text: str) -> str:
        """Step `index` (0-based) as it appears in a solution, separator included."""
        return f"{self.head(index)}{text}{self.separator}"

    def render(self, steps: Sequence[str], start: int = 0) -> str:
        """The canonical text of `steps` (numbered from `start`): what exports write and offsets refer to."""
        return "".join(self.render_step(start + i, s) for i, s in enumerate(steps))

    def prefix(self, steps: Sequence[str], written: Sequence[str | None] | None = None) -> str:
        """The prefix text of a prompt continuing `steps`: each step as the model wrote it (`written[i]`, its
        label and separator included) where known, else rendered canonically. Prompts are built from this,
        so a policy always reads back its own text, whatever labels or separators the stored steps dropped."""
        if written is None:
            return self.render(steps)
        if len(written) == len(steps) and None not in written:  # a tree's prefix: every step as the policy wrote it
            return "".join(written)  # type: ignore[arg-type]
        return "".join(w if w is not None else self.render_step(i, s) for i, (s, w) in enumerate(zip(steps, written)))

    def spans(self, steps: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
        """(char_start, char_end) of each step's text inside `render(steps, start)`."""
        out: list[tuple[int, int]] = []
        offset = 0
        for i, text in enumerate(steps):
            begin = offset + len(self.head(start + i))
            out.append((begin, begin + len(text)))
            offset = begin + len(text) + len(self.separator)
        return out

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end generation after exactly one step."""
        return (self.separator,)


@dataclass(frozen=True)
class Segment:
    """One step of a generated text. `text == source[start:end]` is the step as stored (no label, no
    surrounding blanks); `generated` is the slice of the source the step came from, the model's own label
    and the separator after it included, so that the segments of a text put together give the text back."""

    text: str
    start: int
    end: int
    generated: str = ""


def segment(text: str, fmt: StepFormat, *, stopped_at: str | None = None) -> list[Segment]:
    """Split a solution into steps, dropping labels and blank pieces but keeping exact offsets. Every
    character of `text` belongs to the `generated` slice of exactly one segment (blank pieces join the step
    before them, or the first step), so a prefix rebuilt from segments is what the model wrote.

    `stopped_at`: the stop string that ended generation and was cut from `text` (the one-step separator):
    the model wrote it, so it ends the last segment's `generated` text."""
    pieces: list[tuple[int, int, int]] = []  # (start of the piece's text, its end, the end of its slice)
    if fmt.mode == "step-label":
        heads = list(_STEP_HEAD_RE.finditer(text))
        # A step's slice runs up to the next label itself: the newline and blanks before a label are the
        # separator the model wrote after the step before it.
        label_at = [m.start() + len(m.group()) - len(m.group().lstrip()) for m in heads] + [len(text)]
        if not heads:
            pieces.append((0, len(text), len(text)))
        else:
            lead = heads[0].start()
            if lead:
                pieces.append((0, lead, label_at[0]))
            for j, m in enumerate(heads):
                end = heads[j + 1].start() if j + 1 < len(heads) else len(text)
                pieces.append((m.end(), end, label_at[j + 1]))
    else:
        pos = 0
        while pos <= len(text):
            nxt = text.find(fmt.separator, pos)
            end = len(text) if nxt < 0 else nxt
            pieces.append((pos, end, end if nxt < 0 else nxt + len(fmt.separator)))
            if nxt < 0:
                break
            pos = nxt + len(fmt.separator)
    out: list[Segment] = []
    carry = 0  # where the next segment's slice starts: blank pieces before it belong to it
    for start, end, stop in pieces:
        seg = _strip_piece(text[start:end], start, strip_label=fmt.mode == "separator")
        if seg is None:
            if out:  # blank: the previous step's slice grows over it
                last = out[-1]
                out[-1] = Segment(last.text, last.start, last.end, last.generated + text[carry:stop])
                carry = stop
            continue
        out.append(Segment(seg[0], seg[1], seg[1] + len(seg[0]), text[carry:stop]))
        carry = stop
    if out and stopped_at:
        last = out[-1]
        out[-1] = Segment(last.text, last.start, last.end, last.generated + stopped_at)
    return out


def count_steps(text: str, fmt: StepFormat) -> int:
    """``len(segment(text, fmt))`` without building the segments: the pieces that keep some text once their
    label and blanks are dropped (the engine counts generated steps of every completion this way)."""
    if fmt.mode == "step-label":
        heads = list(_STEP_HEAD_RE.finditer(text))
        if not heads:
            return 1 if text.strip() else 0
        bounds = [m.end() for m in heads]
        ends = [m.start() for m in heads[1:]] + [len(text)]
        lead = heads[0].start()
        n = 1 if lead and text[:lead].strip() else 0
        return n + sum(1 for a, e in zip(bounds, ends) if text[a:e].strip())
    if fmt.separator == "\n":  # the default: lines, less those that are no step, in one C-level scan
        return text.count("\n") + 1 - len(_NO_STEP_LINE_RE.findall(text))
    n = 0
    for piece in text.split(fmt.separator):
        if piece.strip():
            m = _LABEL_RE.match(piece)
            if m is None or piece[m.end():].strip():
                n += 1
    return n


def _strip_piece(piece: str, start: int, strip_label: bool) -> tuple[str, int] | None:
    """(the piece without label and surrounding blanks, its offset), or None when nothing is left."""
    if strip_label:
        m = _LABEL_RE.match(piece)
        if m:
            start += m.end()
            piece = piece[m.end() :]
    lead = len(piece) - len(piece.lstrip())
    piece = piece.strip()
    return (piece, start + lead) if piece else None


@lru_cache(maxsize=64)
def compile_template(template: str) -> jinja2.Template:
    """A Jinja template, sandboxed like transformers' chat-template renderer: templates may come from model
    repos. Raises `jinja2.TemplateSyntaxError`."""
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                        trim_blocks=False, lstrip_blocks=False)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@lru_cache(maxsize=64)
def _steps_come_last(template: str) -> bool:
    """Whether `template` renders as a text that does not depend on `steps`, then `steps` verbatim: `steps` is
    read once, as the last thing the template writes (`... {{ steps }}` with nothing after it, no filter), and
    nothing else can reach the render's variables (no include, import or extends). Then rendering with
    `steps=p` gives the rendering with `steps=""` followed by `p`, exactly (no autoescape, no finalize)."""
    tree = compile_template(template).environment.parse(template)
    if next(tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)), None) is not None:
        return False
    reads = [n for n in tree.find_all(nodes.Name) if n.name == "steps"]
    last = tree.body[-1] if tree.body else None
    return (len(reads) == 1 and isinstance(last, nodes.Output) and bool(last.nodes)
            and last.nodes[-1] is reads[0])


@lru_cache(maxsize=64)
def _plain_pieces(template: str) -> tuple[str | None, ...] | None:
    """`template` as literal texts and its `{{ question }}` reads (None), where it is nothing else: one output of
    template data and the bare names `question` and `steps` (no filter, tag or other variable). Rendering it
    with `steps=""` is then those pieces joined, `question` written as Jinja writes a variable (`str`: no
    autoescape, no finalize), which costs 0.1 µs instead of Jinja's ~10 µs per render (a new context each),
    the most of a pair export's records at one question per problem. None for any other template."""
    tree = compile_template(template).environment.parse(template)
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    out: list[str | None] = []
    for node in tree.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            out.append(node.data)
        elif isinstance(node, nodes.Name) and node.name == "question":
            out.append(None)
        elif not (isinstance(node, nodes.Name) and node.name == "steps"):
            return None
    return tuple(out)


@lru_cache(maxsize=4096)
def _question_part(template: str, question: str) -> str:
    """`template` rendered with `question` and no steps: a prompt template's head, a chat's user message."""
    pieces = _plain_pieces(template)
    if pieces is not None:
        text = str(question)
        return "".join(text if p is None else p for p in pieces)
    return compile_template(template).render(question=question, steps="")


def _chat_parts(chat_template: str, messages: Sequence[dict[str, str]], bos_token: str,
                eos_token: str) -> tuple[str, str]:
    """(the generation prompt, the text before an open assistant reply) of `messages`."""
    tpl = compile_template(chat_template)
    empty = tpl.render(messages=list(messages), add_generation_prompt=True, bos_token=bos_token,
                       eos_token=eos_token)
    full = tpl.render(messages=[*messages, {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False,
                      bos_token=bos_token, eos_token=eos_token)
    cut = full.find(_SENTINEL)
    if cut < 0:
        raise ValueError("the chat template dropped the assistant message; it cannot continue a reply")
    return empty, full[:cut]


@lru_cache(maxsize=4096)
def _chat_turns(chat_template: str, system: str | None, user: str, bos_token: str,
                eos_token: str) -> tuple[str, str]:
    """`_chat_parts` of a system (if any) and a user message: one render pair per question, not per node."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return _chat_parts(chat_template, messages, bos_token, eos_token)


def _open_reply(empty: str, head: str, prefix: str) -> str:
    # With an empty prefix the prompt must equal the generation prompt, so that every child's prompt
    # extends it; templates that render the two differently (e.g. thinking tags) are refused, not patched.
    if not prefix and head != empty:
        raise ValueError("the chat template renders an open assistant reply differently from its generation "
                         f"prompt ({head[-40:]!r} vs {empty[-40:]!r}); prefix reuse would break")
    return head + prefix


def render_chat(chat_template: str, messages: Sequence[dict[str, str]], prefix: str | None, *,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with an HF-style chat template, leaving an assistant reply that starts with `prefix`
    open for the model to continue (`None`: only the generation prompt, e.g. for a judge)."""
    if prefix is None:
        return compile_template(chat_template).render(messages=list(messages), add_generation_prompt=True,
                                                      bos_token=bos_token, eos_token=eos_token)
    return _open_reply(*_chat_parts(chat_template, messages, bos_token, eos_token), prefix)


class PromptLayout(BaseModel):
    """What a prompt is made of, as a release's manifest records it (`config.prompt`): the question goes
    through `template`, the steps prefix comes last. `render` is the one way a node becomes a prompt, for
    the build and for exports alike."""

    model_config = ConfigDict(extra="ignore")

    family: Literal["completion", "chat"] = Field(
        "completion",
        description="`completion`: `template` is the whole prompt. `chat`: `template` is the user message, the "
        "steps open the assistant's reply, and `chat_template` lays them out.",
    )
    template: str = Field(
        DEFAULT_TEMPLATE,
        description="Jinja template with `question` and (completion family) `steps`, the prefix already rendered "
        "by the step format; the prefix must come last so each child prompt extends its parent's prompt.",
    )
    chat_template: str | None = Field(
        None, description="A Hugging Face style chat template (`messages`, `add_generation_prompt`, `bos_token`), "
        "e.g. a tokenizer's `chat_template`; only for the chat family.",
    )
    system: str | None = Field(None, description="System message (chat family); none when unset.")
    bos_token: str = Field("", description="`bos_token` as the chat template sees it.")
    eos_token: str = Field("", description="`eos_token` as the chat template sees it.")
    step_format: StepFormat = Field(default_factory=StepFormat)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "PromptLayout":
        """The layout a manifest recorded (`config.prompt`); the defaults for a release that records none."""
        try:
            layout = cls.model_validate(record or {})
            for text in (layout.template, layout.chat_template):
                if text is not None:
                    compile_template(text)
        except ValidationError as exc:
            raise StorageError(f"the manifest's `config.prompt` is not a valid prompt layout: "
                               f"{exc.errors()[0]['msg']}", field="config.prompt") from None
        except jinja2.TemplateSyntaxError as exc:
            raise StorageError(f"the manifest's `config.prompt` template is not valid Jinja: {exc}",
                               field="config.prompt") from None
        if layout.family == "chat" and layout.chat_template is None:
            raise StorageError("the manifest's `config.prompt` has family=chat but no chat_template.",
                               field="config.prompt.chat_template")
        return layout

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end generation after one step: the segmenter's, by construction."""
        return self.step_format.stop

    def step(self, index: int, text: str) -> str:
        """Stored step `index` (0-based) rendered canonically, separator included."""
        return self.step_format.render_step(index, text)

    def steps(self, steps: Sequence[str], start: int = 0) -> str:
        """Stored steps rendered canonically (see `StepFormat.render`)."""
        return self.step_format.render(steps, start)

    def user_message(self, question: str) -> str:
        """The problem as the user turn (chat) or the template with no steps (completion)."""
        return _question_part(self.template, question)

    def messages(self, question: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.user_message(question)}]

    def render(self, question: str, prefix: str) -> str:
        """The full prompt of a node: the question through the template, then `prefix` (the steps so far,
        as text) verbatim at the end, so a child's prompt is its parent's plus its own step.

        Every node of a problem shares the part before its prefix, so that part is rendered once per question
        (a Jinja render per request was a tenth of the engine's CPU per request) wherever that is exact: a chat
        always, a completion template that writes `{{ steps }}` last (`_steps_come_last`); any other template is
        rendered whole each time."""
        if self.family == "completion":
            if _steps_come_last(self.template):
                return _question_part(self.template, question) + prefix
            return compile_template(self.template).render(question=question, steps=prefix)
        if self.chat_template is None:
            raise ValueError("`prompt.family=chat` needs a `chat_template`")
        return _open_reply(*_chat_turns(self.chat_template, self.system, self.user_message(question),
                                        self.bos_token, self.eos_token), prefix)

    def prompt_head(self, question: str) -> str | None:
        """What every prompt of `question` is before its prefix, where `render(question, prefix)` is exactly it
        followed by `prefix` for any prefix (the exports render it once per problem); None where it is not: a
        completion template that does not write `{{ steps }}` last, a chat whose open reply differs from its
        generation prompt (`render` refuses an empty prefix there) or that has no chat template."""
        if self.family == "completion":
            return _question_part(self.template, question) if _steps_come_last(self.template) else None
        if self.chat_template is None:
            return None
        empty, head = _chat_turns(self.chat_template, self.system, self.user_message(question), self.bos_token,
                                  self.eos_token)
        return head if head == empty else None

    def plain_head(self) -> tuple[str | None, ...] | None:
        """Where `prompt_head(question)` is the join of fixed pieces around the question (a completion template
        of text, `{{ question }}` and a last `{{ steps }}`: `_plain_pieces`): those pieces, None for the question
        (written as `str(question)`), so the exports can join them for a whole column; None otherwise."""
        if self.family == "completion" and _steps_come_last(self.template):
            return _plain_pieces(self.template)
        return None

    def prompt(self, question: str, prefix_steps: Sequence[str] = ()) -> str:
        """The prompt of a node whose steps are `prefix_steps` (stored steps, rendered canonically)."""
        return self.render(question, self.steps(prefix_steps))
