"""Prompt templates per model family: packaged templates, chat rendering, prefix extension, stop strings that
agree with the segmenter, and the config errors users see."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from flows.config import BuildConfig
from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.prompt import PromptConfig, chatml_to_messages, load_template, packaged_templates, render_prompt
from tasks.search.engine import derive_seed
from storage.render import StepFormat, segment
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic, parse_step

FAMILIES = [
    {},
    {"template_name": "fewshot-steps"},
    {"family": "chat"},
    {"family": "chat", "system": "You are careful."},
    {"template_name": "fewshot-steps", "step_format": {"separator": "\n\n"}},
]


def test_packaged_templates_are_shipped():
    assert {"plain", "fewshot-steps", "chat-user", "chatml"} <= set(packaged_templates())
    with pytest.raises(ValueError, match="no packaged template 'nope'"):
        load_template("nope")


@pytest.mark.parametrize("changes", FAMILIES)
def test_every_child_prompt_extends_its_parent(changes):
    cfg = PromptConfig(**changes)
    steps = ["a = 1", "b = 2", "The answer is 2."]
    prompts = [render_prompt(cfg, "What is it?", steps[:i]) for i in range(len(steps) + 1)]
    for parent, child, step in zip(prompts, prompts[1:], steps):
        assert child == parent + cfg.step_format.render_step(prompts.index(parent), step)


@pytest.mark.parametrize("changes", FAMILIES)
def test_generation_stops_where_the_segmenter_splits(changes):
    """The simulated policy, stopped at the config's stop strings, writes exactly one step that the segmenter
    reads back; and a full solution segments into the steps it wrote, whatever the family and separator."""
    cfg = PromptConfig(**changes)
    fmt = cfg.step_format
    policy = SimulatedPolicy(SimulatedPolicyConfig(step_error_rate=0.0), fmt)  # no errors: one true path
    for p in load_synthetic(SyntheticSourceConfig(num_problems=6, seed=8)).problems:
        prompt = render_prompt(cfg, p.question, [])
        full = policy.sample(prompt, 1, 0).text
        steps = [s.text for s in segment(full, fmt)]
        assert len(steps) >= 2 and all(parse_step(s) for s in steps)
        written: list[str] = []
        for expected in steps:
            prompt = render_prompt(cfg, p.question, written)
            one = policy.sample(prompt, 1, 0, stop=cfg.stop)
            assert [s.text for s in segment(one.text, fmt)] == [expected]
            assert fmt.separator not in one.text
            written.append(expected)


def test_chatml_round_trips_to_messages():
    cfg = PromptConfig(family="chat", system="sys")
    prompt = render_prompt(cfg, "Q?", ["one"])
    messages, open_reply = chatml_to_messages(prompt)
    assert open_reply and messages[0] == {"role": "system", "content": "sys"}
    assert messages[1]["role"] == "user" and "Q?" in messages[1]["content"]
    assert messages[2] == {"role": "assistant", "content": "Step 1: one\n"}
    assert chatml_to_messages(render_prompt(cfg, "Q?", []))[1] is False  # just the generation prompt
    with pytest.raises(ValueError, match="ChatML"):
        chatml_to_messages("Question: plain\nAnswer:\n")


def test_http_chat_and_completions_agree_with_in_process_on_chat_prompts():
    from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
    from tasks.testing.standin_server import StandinServer

    cfg = PromptConfig(family="chat")
    problems = load_synthetic(SyntheticSourceConfig(num_problems=4, seed=1)).problems
    reqs = [GenerationRequest(render_prompt(cfg, p.question, []), SamplingParams(n=2, seed=derive_seed(0, i)))
            for i, p in enumerate(problems)]
    want = [[c.text for c in g] for g in asyncio.run(SimulatedPolicy().generate(reqs))]
    with StandinServer() as srv:
        for endpoint in ("chat", "completions"):
            pol = OpenAIPolicy(OpenAIPolicyConfig(base_url=srv.base_url, model="simulated-arith", endpoint=endpoint,
                                                  api_key_env=None))
            got = asyncio.run(pol.generate(reqs))
            asyncio.run(pol.aclose())
            assert [[c.text for c in g] for g in got] == want


def test_template_text_is_kept_in_the_config_and_the_build_key():
    a = BuildConfig.model_validate({"prompt": {"template_name": "fewshot-steps"}})
    assert a.prompt.template == load_template("fewshot-steps")
    again = BuildConfig.model_validate(a.model_dump(mode="json"))  # the manifest's config loads back
    assert again == a and again.build_key() == a.build_key()
    assert a.build_key() != BuildConfig().build_key()
    chat = BuildConfig.model_validate({"prompt": {"family": "chat"}})
    assert chat.prompt.chat_template == load_template("chatml") and chat.prompt.template_name == "chat-user"


@pytest.mark.parametrize("prompt,message", [
    ({"template_name": "plain", "template": "Q {{ question }} {{ steps }}"}, "disagree"),
    ({"template": "{{ question "}, "not valid Jinja"),
    ({"template": "Q: {{ question }}"}, "must place `{{ steps }}`"),
    ({"chat_template": "{{ messages }}"}, "only used with `prompt.family=chat`"),
])
def test_config_errors_say_what_to_do(prompt, message):
    with pytest.raises(ValidationError, match=message):
        BuildConfig.model_validate({"prompt": prompt})


def test_chat_endpoint_needs_chatml_prompts():
    # A check the config can make alone: it fails when the config is built, not inside a shard.
    policy = {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "endpoint": "chat"}
    with pytest.raises(ValidationError, match="needs `prompt.family=chat`"):
        BuildConfig.model_validate({"policy": policy})
    assert BuildConfig.model_validate({"policy": policy, "prompt": {"family": "chat"}}).policy.endpoint == "chat"


def test_step_label_mode_stop_strings():
    fmt = StepFormat(mode="step-label")
    assert fmt.stop == ("\n",)
    text = "Step 1: a = 1\nStep 2: b = 2\n"
    assert [s.text for s in segment(text, fmt)] == ["a = 1", "b = 2"]


LLAMA_LIKE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def _tokenizer_folder(path, **config) -> str:
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_chat_template_from_a_tokenizer_folder_is_stored_as_text(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok", chat_template=LLAMA_LIKE, bos_token={"content": "<s>"},
                               eos_token="</s>")
    cfg = BuildConfig.model_validate({"prompt": {"chat_template_from": folder}})
    p = cfg.prompt
    assert (p.family, p.chat_template, p.bos_token, p.eos_token) == ("chat", LLAMA_LIKE, "<s>", "</s>")
    assert render_prompt(p, "1+1?", ["1+1=2"]).startswith("<s><|start|>user\n")
    dumped = cfg.model_dump(mode="json")  # what the manifest and Prefect's parameters hold
    assert dumped["prompt"]["chat_template"] == LLAMA_LIKE and "chat_template_from" not in dumped["prompt"]
    (tmp_path / "tok" / "tokenizer_config.json").unlink()  # the folder may be gone where the config is reloaded
    again = BuildConfig.model_validate(dumped)
    assert again.model_dump() == cfg.model_dump() and again.build_key() == cfg.build_key()
    moved = _tokenizer_folder(tmp_path / "elsewhere", chat_template=LLAMA_LIKE, bos_token="<s>", eos_token="</s>")
    assert BuildConfig.model_validate({"prompt": {"chat_template_from": moved}}).build_key() == cfg.build_key()


def test_chat_template_from_reads_what_transformers_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a"])}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = LLAMA_LIKE
    tok.save_pretrained(tmp_path)
    from tasks.prompt import prompt_config_from_tokenizer

    got = PromptConfig(chat_template_from=str(tmp_path))
    want = prompt_config_from_tokenizer(transformers.AutoTokenizer.from_pretrained(tmp_path))
    assert got.model_dump() == want.model_dump()


@pytest.mark.parametrize("prompt,message", [
    ({"family": "completion"}, "needs `prompt.family=chat`"),
    ({"chat_template_name": "chatml"}, "set only one"),
    ({"chat_template": "{{ messages }}"}, "disagrees with the tokenizer"),
    ({"bos_token": "<bos>"}, "disagrees with the tokenizer"),
])
def test_chat_template_from_conflicts_are_refused(tmp_path, prompt, message):
    folder = _tokenizer_folder(tmp_path / "tok", chat_template=LLAMA_LIKE, bos_token="<s>")
    with pytest.raises(ValidationError, match=message):
        PromptConfig(chat_template_from=folder, **prompt)


def test_chat_template_from_needs_a_folder_with_a_template(tmp_path):
    with pytest.raises(ValidationError, match="local tokenizer folder"):
        PromptConfig(chat_template_from=str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="no chat template"):
        PromptConfig(chat_template_from=_tokenizer_folder(tmp_path / "plain", bos_token="<s>"))
    named = _tokenizer_folder(tmp_path / "named", chat_template=[{"name": "tool_use", "template": "x"},
                                                                 {"name": "default", "template": LLAMA_LIKE}])
    assert PromptConfig(chat_template_from=named).chat_template == LLAMA_LIKE
