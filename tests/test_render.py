"""The rendering contract (storage/render.py): segmentation, step rendering, offsets and the prompt layout,
one module that the build and the exports both use."""

from __future__ import annotations

import pytest

from conftest import REPO
from storage.errors import StorageError
from storage.render import DEFAULT_TEMPLATE, PromptLayout, StepFormat, compile_template, render_chat, segment
from tasks.prompt import PromptConfig, render_prompt

TEXTS = [
    "Step 1: a = 1.\nStep 2: b = 2.\nStep 3: The answer is 3.\n",
    "  Step 1:  a = 1.  \n\n\nStep 2. b\n   \nlast step without a separator",
    "no label here\nStep 7: numbered oddly\n",
    "\n\n",
    "",
    "Answer first.\n\nStep 1: x\n\nStep 2: y \n Step 3: z",
]
FORMATS = [StepFormat(), StepFormat(label=None), StepFormat(separator="\n\n"), StepFormat(mode="step-label")]


@pytest.mark.parametrize("fmt", FORMATS, ids=["default", "no-label", "blank-line", "step-label"])
@pytest.mark.parametrize("text", TEXTS)
def test_segments_keep_offsets_and_their_generated_slices_give_the_text_back(text, fmt):
    segs = segment(text, fmt)
    assert all(text[s.start:s.end] == s.text and s.text == s.text.strip() and s.text for s in segs)
    if segs:
        assert "".join(s.generated for s in segs) == text, "every character belongs to exactly one step"
        assert all(s.text in s.generated for s in segs)
    assert segment(text, fmt, stopped_at="\n")[-1:] == [
        type(s)(s.text, s.start, s.end, s.generated + "\n") for s in segs[-1:]], "a cut stop string ends the last step"


def test_a_step_owns_the_separator_after_it():
    fmt = StepFormat(mode="step-label")
    assert [s.generated for s in segment("Step 1: a\n\nStep 2: b \nStep 3: c", fmt)] == \
        ["Step 1: a\n\n", "Step 2: b \n", "Step 3: c"]
    assert [s.generated for s in segment("Step 1: a\n\n\nStep 2: b\n", StepFormat())] == \
        ["Step 1: a\n\n\n", "Step 2: b\n"]


@pytest.mark.parametrize("fmt", FORMATS, ids=["default", "no-label", "blank-line", "step-label"])
def test_spans_locate_each_step_in_the_canonical_rendering(fmt):
    steps = ["a = 1.", "b = 2.", "The answer is 3."]
    for start in (0, 2):
        text = fmt.render(steps, start)
        spans = fmt.spans(steps, start)
        assert [text[a:b] for a, b in spans] == steps
        if start == 0:
            assert [(s.start, s.end) for s in segment(text, fmt)] == spans
    assert fmt.prefix(steps, [None, "Step 2 -> b = 2.\n", None]) == \
        fmt.render_step(0, steps[0]) + "Step 2 -> b = 2.\n" + fmt.render_step(2, steps[2])


CONFIGS = [
    PromptConfig(),
    PromptConfig(step_format={"separator": "\n\n", "label": None}),
    PromptConfig(template_name="fewshot-steps"),
    PromptConfig(family="chat", system="Be brief."),
    PromptConfig(family="chat", step_format={"mode": "step-label"}),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "unlabelled", "fewshot", "chat", "chat-step-label"])
def test_a_release_renders_from_its_manifest_exactly_what_the_build_rendered(cfg):
    recorded = PromptLayout.from_record(cfg.model_dump(mode="json"))  # what a manifest's config.prompt holds
    steps = ["Ava has 5 + 3 = 8 apples.", "The answer is 8."]
    for prefix in ([], steps[:1], steps):
        assert recorded.prompt("How many apples?", prefix) == render_prompt(cfg, "How many apples?", prefix)
    assert recorded.user_message("Q?") == cfg.user_message("Q?") and recorded.steps(steps, 1) == cfg.steps(steps, 1)


def test_a_release_without_a_recorded_prompt_gets_the_builds_defaults():
    assert PromptLayout.from_record(None).prompt("Q?", ["x"]) == render_prompt(PromptConfig(), "Q?", ["x"])
    assert PromptLayout.from_record({"template": "{{ question }} {{ steps }}"}).prompt("Q?", ["x"]) == "Q? Step 1: x\n"
    with pytest.raises(StorageError, match="not valid Jinja"):
        PromptLayout.from_record({"template": "{{ question"})
    with pytest.raises(StorageError, match="no chat_template"):
        PromptLayout.from_record({"family": "chat"})


def test_rendering_is_written_once():
    """The default prompt, the segmenter's label pattern and the sandboxed template environment live only in
    storage/render.py (the Math-Shepherd export's own `step_label` option is that format's, not a copy)."""
    needles = [DEFAULT_TEMPLATE, "Step\\s*\\d+", "SandboxedEnvironment", "fmt.label.format", "self.label.format"]
    for path in sorted([*REPO.glob("tasks/**/*.py"), *REPO.glob("storage/**/*.py"), *REPO.glob("flows/**/*.py")]):
        if path.name == "render.py" and path.parent.name == "storage":
            continue
        source = path.read_text(encoding="utf-8")
        for needle in needles:
            assert needle not in source, f"{path.relative_to(REPO)} repeats {needle!r}: use storage.render"


@pytest.mark.parametrize("fmt", FORMATS, ids=["default", "no-label", "blank-line", "step-label"])
def test_count_steps_is_the_number_of_segments(fmt):
    """The engine counts each completion's steps with `count_steps` (no segments built): the same number."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from storage.render import count_steps

    for text in TEXTS:
        assert count_steps(text, fmt) == len(segment(text, fmt)), text

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["Step 1:", "step 12.", "Step", " ", "\n", "\n\n", "x", "The answer is 3.", ":"]),
                    max_size=12).map("".join))
    def same(text: str) -> None:
        assert count_steps(text, fmt) == len(segment(text, fmt))

    same()


@pytest.mark.parametrize("template, reused", [
    (DEFAULT_TEMPLATE, True),
    ("{{ question }}\n{# a comment #}{{ steps }}", True),
    ("{% if steps %}Go on:\n{% endif %}Q: {{ question }}\n{{ steps }}", False),  # steps read twice
    ("Q: {{ question }}\n{{ steps | upper }}", False),  # not verbatim
    ("Q: {{ question }}\n{{ steps }}\n", False),  # something after the steps
    ("{% set s = steps %}Q: {{ question }}\n{{ s }}", False),
])
def test_a_prompt_head_is_rendered_once_per_question_only_where_that_is_exact(template, reused):
    from storage.render import _steps_come_last

    assert _steps_come_last(template) is reused
    layout = PromptLayout(template=template)
    for prefix in ["", "Step 1: a = 1.\n", "Step 1: x\nStep 2: {{ question }} $1\n"]:
        whole = compile_template(template).render(question="What is 1 + {{ 2 }}?", steps=prefix)
        assert layout.render("What is 1 + {{ 2 }}?", prefix) == whole


def test_a_plain_template_head_is_joined_exactly_as_jinja_renders_it():
    """`_question_part` joins the pieces of a template that is only text, `{{ question }}` and `{{ steps }}`
    (`_plain_pieces`) instead of rendering it: the same text as Jinja's render for any mix of pieces (newlines
    normalised, whitespace control, comments, raw blocks), and the same result (or error) for templates that
    are not plain (filters, tags, other variables, a `None` question)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from storage.render import _plain_pieces, _question_part

    pieces = ["Q: ", "{{ question }}", "{{question}}", "{{- question }}", "{{ question -}}", "{{ steps }}", "{{ steps -}}",
              "\n", "\r\n", "\r", "  ", "\t", "A:", "{# note #}", "{% raw %}{{ x }}{% endraw %}", "$1 \\ é",
              "{{ question | upper }}", "{% if question %}y{% endif %}", "{{ other }}", "{{ 'lit' }}", "{{ steps ~ question }}"]
    questions = st.one_of(st.none(), st.text(alphabet="ab {}%#\n\r\t\\é'\"", max_size=8))

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from(pieces), max_size=8).map("".join), questions)
    def same(template: str, question: str | None) -> None:
        try:
            want = ("ok", compile_template(template).render(question=question, steps=""))
        except Exception as exc:  # noqa: BLE001  (the very error, whatever Jinja raises)
            want = ("error", type(exc), str(exc))
        _question_part.cache_clear()
        try:
            got = ("ok", _question_part(template, question))
        except Exception as exc:  # noqa: BLE001
            got = ("error", type(exc), str(exc))
        assert got == want, (template, question, _plain_pieces(template))

    same()
    assert _plain_pieces(DEFAULT_TEMPLATE) == ("Question: ", None, "\nAnswer:\n")
    assert _plain_pieces("Q: {{ question | upper }}\n{{ steps }}") is None


def test_a_chat_prompt_is_its_open_reply_plus_the_prefix():
    from tasks.prompt import load_template

    layout = PromptLayout(family="chat", chat_template=load_template("chatml"), system="Be brief.")
    for prefix in ["", "Step 1: a = 1.\n"]:
        assert layout.render("What is 1 + 1?", prefix) == render_chat(
            layout.chat_template, layout.messages("What is 1 + 1?"), prefix)
    assert layout.render("What is 1 + 1?", "").endswith("<|im_start|>assistant\n")


def test_counting_lines_that_are_steps_matches_segmenting_for_every_blank():
    """The default separator's count is a scan for lines that are no step; `\\s` there and `str.strip` must agree
    on every kind of blank."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from storage.render import count_steps

    pieces = ["Step 1:", "STEP 12 .", "step", "3", " ", "\t", "\r", "\u00a0", "\u2003", "\x1c", "\x85", "\u2028", "\n",
              "\n\n", "x", "The answer is 3.", ":", ".", "Step 1: a", "\u0663"]

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.sampled_from(pieces), max_size=14).map("".join))
    def check(text: str) -> None:
        for fmt in (StepFormat(), StepFormat(label=None)):
            assert count_steps(text, fmt) == len(segment(text, fmt)), repr(text)

    check()
