"""Token-ID prompts over HTTP (`policy.tokenizer`): a child prompt's IDs start with its parent's exactly,
the stand-in decodes them as vLLM does with the served model's tokenizer, and a build sent that way labels
exactly like the in-process policy."""

from __future__ import annotations

import asyncio
import json
import string

import httpx
import pytest

transformers = pytest.importorskip("transformers")

from flows.build import build_dataset  # noqa: E402
from storage.errors import ConfigError  # noqa: E402
from tasks.policy.base import GenerationRequest, SamplingParams  # noqa: E402
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig  # noqa: E402
from tasks.testing.standin_server import StandinServer, StandinServerConfig  # noqa: E402
from test_backend_build import MODEL, _cfg, _openai, _rows  # noqa: E402


def _save_tokenizer(path, merged: tuple[str, ...] = ()):
    """A character-level tokenizer covering printable ASCII, plus `merged` multi-character tokens, built
    here (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *merged, *dict.fromkeys(string.printable)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join([*(m.replace("\n", "\\n") for m in merged), r"[\s\S]"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _save_tokenizer(tmp_path_factory.mktemp("char-tokenizer"))


@pytest.fixture(scope="module")
def merging_tokenizer_dir(tmp_path_factory):
    # "\nS" is one token, as BPE vocabularies merge across a step boundary: re-encoding a child prompt
    # whole would not start with its parent's IDs (the parent ends in "\n").
    return _save_tokenizer(tmp_path_factory.mktemp("merging-tokenizer"), merged=("\nS",))


def test_a_child_prompt_extends_its_parents_token_ids(merging_tokenizer_dir):
    tokenizer_dir = merging_tokenizer_dir
    bodies: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "finish_reason": "stop",
                                                      "stop_reason": "\n"}], "usage": {}})

    cfg = OpenAIPolicyConfig(base_url="http://tok.test/v1", model=MODEL, tokenizer=str(tokenizer_dir))
    policy = OpenAIPolicy(cfg, transport=httpx.MockTransport(answer))
    parent = "Question: Ava has 5 apples.\nAnswer:\n"
    child = parent + "Step 1: Ava has 5 + 3 = 8 apples.\n"

    async def go():
        try:
            for prompt in (parent, child):
                await policy.generate([GenerationRequest(prompt, SamplingParams(n=1, seed=0, stop=("\n",)))])
        finally:
            await policy.aclose()

    asyncio.run(go())
    ids_parent, ids_child = bodies[0]["prompt"], bodies[1]["prompt"]
    assert all(isinstance(t, int) for t in ids_child) and ids_child[: len(ids_parent)] == ids_parent
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.decode(ids_child) == child and len(ids_child) > len(ids_parent)
    whole = tok.encode(child, add_special_tokens=False)
    assert whole[: len(ids_parent)] != ids_parent, "re-encoding the whole text would have broken the prefix"


def test_token_prompts_need_the_completions_endpoint(tokenizer_dir):
    from flows.config import load_config

    with pytest.raises(ConfigError, match="policy.endpoint=completions"):
        load_config(None, ["policy.kind=openai", "policy.base_url=http://h/v1", "policy.model=m",
                           "policy.endpoint=chat", f"policy.tokenizer={tokenizer_dir}"])


@pytest.mark.usefixtures("prefect_server")
def test_a_build_with_token_id_prompts_labels_like_in_process(small_config, tmp_path, tokenizer_dir):
    root = tmp_path / "data"
    build_dataset(_cfg(small_config))
    with StandinServer(StandinServerConfig(model=MODEL, tokenizer=str(tokenizer_dir))) as srv:
        build_dataset(_cfg(small_config, policy=_openai(srv.base_url, tokenizer=str(tokenizer_dir))))
        stats = srv.stats
    assert stats.token_prompts == stats.answered > 0, "every prompt went as token IDs"
    assert _rows(root, "demo", 2, "steps") == _rows(root, "demo", 1, "steps")
    assert _rows(root, "demo", 2, "pairs") == _rows(root, "demo", 1, "pairs")


def test_token_ids_depend_on_the_text_alone_not_on_what_was_sent_before(merging_tokenizer_dir):
    from tasks.policy.openai_compat import BoundaryEncoder

    tok = transformers.AutoTokenizer.from_pretrained(merging_tokenizer_dir)
    root = "Question: Ava has 5 apples.\nAnswer:\n"
    p1 = root + "Step 1: Ava has 5 + 3 = 8 apples.\n"
    x = p1 + "Step 2: Ava has 8 * 2 = 16 apples.\n"
    warm, cold = BoundaryEncoder(tok, ("\n",)), BoundaryEncoder(tok, ("\n",))
    warm.encode(root), warm.encode(p1)  # a history that a cache hit or a resume would not have
    assert warm.encode(x) == cold.encode(x)
    assert cold.encode(x)[: len(cold.encode(p1))] == cold.encode(p1)
    assert tok.decode(cold.encode(x)) == x


def test_add_special_tokens_is_honoured_for_token_prompts(merging_tokenizer_dir):
    from tasks.policy.openai_compat import BoundaryEncoder

    class WithBos:  # a tokenizer that adds a BOS (id 0) when asked to, as Llama's does
        bos_token = "<s>"

        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [ord(c) for c in text]

    text = "Q: 1+1?\nA:\n"
    assert BoundaryEncoder(WithBos(), ("\n",)).encode(text)[0] == 0
    assert BoundaryEncoder(WithBos(), ("\n",), add_special_tokens=False).encode(text)[0] == ord("Q")
    assert BoundaryEncoder(WithBos(), ("\n",)).encode("<s>" + text)[:3] == tuple(map(ord, "<s>"))
