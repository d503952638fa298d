"""The transformers backend on a tiny randomly initialised model and a tokenizer built here (no download):
the real `generate` path, stop strings, log-probs, batching, seeds, prefix token IDs, chat templates."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tasks.policy.base import GenerationRequest, SamplingParams  # noqa: E402
from tasks.policy.hf_transformers import TransformersPolicy, TransformersPolicyConfig  # noqa: E402
from tasks.prompt import prompt_config_from_tokenizer, render_prompt  # noqa: E402
from storage.render import StepFormat, segment  # noqa: E402

CHARS = list("0123456789+-*=. \nSQ:abcdefghijklmnopqrstuvwxyz")  # a-f: HF stop-string matching needs them
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(merged: tuple[str, ...] = ()):
    """A character-level tokenizer, plus `merged` multi-character tokens that encoding always prefers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", *CHARS, *merged])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join([r"<\|im_(?:start|end)\|>", *merged, r"[\s\S]"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", additional_special_tokens=["<|im_start|>",
                                                                                              "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def _save_tiny_model(path, n_positions: int = 256, merged: tuple[str, ...] = (), favour: str = ""):
    """`merged`: extra multi-character tokens; `favour`: characters the model writes often (so that it
    writes them one by one where encoding would merge them)."""
    tok = _tokenizer(merged)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        # A constant hidden unit (final layer norm: weight 0, bias 5) feeding only "\n" and EOS: steps end
        # after a few tokens (P(newline) ~ 0.2) and EOS is rare, so stop strings get exercised.
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 5.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.convert_tokens_to_ids("\n"), 0] = 0.5
        model.lm_head.weight[tok.eos_token_id, 0] = -1.0
        for ch in favour:
            model.lm_head.weight[tok.convert_tokens_to_ids(ch), 0] = 0.8
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def policy(model_dir):
    return TransformersPolicy(TransformersPolicyConfig(model=str(model_dir), max_batch=8))


def _run(policy, reqs):
    return asyncio.run(policy.generate(reqs))


def test_batched_generate_is_seeded_per_sample_not_per_batch(policy):
    reqs = [GenerationRequest(f"Q: {i}+{i}=", SamplingParams(n=3, seed=i, max_tokens=12)) for i in range(5)]
    together = _run(policy, reqs)
    alone = [_run(policy, [r])[0] for r in reversed(reqs)][::-1]
    assert [[c.text for c in outs] for outs in together] == [[c.text for c in outs] for outs in alone]
    assert all(len(outs) == 3 for outs in together)
    assert len({c.text for c in together[0]}) > 1, "samples of one request differ"
    other_seed = _run(policy, [GenerationRequest(reqs[0].prompt, SamplingParams(n=3, seed=99, max_tokens=12))])
    assert [c.text for c in other_seed[0]] != [c.text for c in together[0]]
    greedy = _run(policy, [GenerationRequest("Q: 1", SamplingParams(n=2, temperature=0, max_tokens=8))])[0]
    assert greedy[0].text == greedy[1].text


def test_stop_strings_log_probs_and_lengths(policy):
    fmt = StepFormat()
    reqs = [GenerationRequest(f"Q: {i}\nStep 1: ", SamplingParams(n=4, seed=i, max_tokens=40, stop=fmt.stop,
                                                                   logprobs=True)) for i in range(6)]
    outs = [c for group in _run(policy, reqs) for c in group]
    stopped = [c for c in outs if c.stop_reason == "\n"]
    assert stopped, "the tiny model ends steps with a newline often"
    for c in outs:
        assert "\n" not in c.text
        assert len(c.token_logprobs) == c.completion_tokens and all(lp <= 0 for lp in c.token_logprobs)
        assert c.mean_logprob == pytest.approx(sum(c.token_logprobs) / len(c.token_logprobs))
        if c.stop_reason is None:  # ran out of tokens, or the model ended with EOS
            assert (c.finish_reason, c.completion_tokens) == ("length", 40) or \
                (c.finish_reason == "stop" and c.completion_tokens < 40)
    for c in stopped:
        assert c.finish_reason == "stop" and c.completion_tokens <= 40
        # Generation and segmentation agree: the stopped text is exactly one more step.
        prefix = "Step 1: earlier\n"
        assert [s.text for s in segment(prefix + c.text + "\n", fmt)] == ["earlier", c.text.strip()] or \
            not c.text.strip()
    kept = _run(policy, [GenerationRequest(r.prompt, SamplingParams(n=4, seed=r.params.seed, max_tokens=40,
                                                                    stop=fmt.stop, include_stop_str_in_output=True))
                         for r in reqs])
    flat = [c for group in kept for c in group]
    assert [c.text for c in flat] == [c.text + ("\n" if c.stop_reason else "") for c in outs]


def test_prompts_extend_earlier_token_ids_and_usage_adds_up(policy):
    parent = "Q: 3\n"
    outs = _run(policy, [GenerationRequest(parent, SamplingParams(n=4, seed=1, max_tokens=30, stop=("\n",),
                                                                  include_stop_str_in_output=True))])[0]
    step = next(c.text for c in outs if c.stop_reason)
    child = parent + step
    _run(policy, [GenerationRequest(child, SamplingParams(n=1, seed=2, max_tokens=4))])
    parent_ids, child_ids = policy._encoder.encode(parent), policy._encoder.encode(child)
    assert child_ids[: len(parent_ids)] == parent_ids
    u = policy.usage
    assert (u.requests, u.samples) == (2, 5) and u.completion_tokens == sum(c.completion_tokens for c in outs) + 4
    assert u.prompt_tokens == len(parent_ids) + len(child_ids)


def test_a_cold_and_a_cache_served_run_send_equal_prompt_ids(tmp_path):
    """Token IDs are a function of the prompt text: a run whose earlier steps come from the rollout cache
    sends the model exactly the IDs of a run that generated them (reusing a parent's generated IDs would
    not: the model writes "a" "b" one token at a time, while encoding the text gives the merged "ab")."""
    from tasks.search.engine import Engine
    from tasks.search.mcts import MCTSConfig, run_problem
    from tasks.search.rollout_cache import RolloutCache
    from tasks.prompt import PromptConfig
    from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
    from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig

    model_dir = _save_tiny_model(tmp_path / "tiny-ab", merged=("ab",), favour="ab")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    problem = load_synthetic(SyntheticSourceConfig(num_problems=1, min_steps=3, max_steps=3)).problems[0]

    def run(cache: RolloutCache, iterations: int) -> dict[str, list[tuple[int, ...]]]:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        sent: dict[str, list[tuple[int, ...]]] = {}
        generate = model.generate

        def recording(*args, **kwargs):
            for row, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()):
                ids = tuple(t for t, m in zip(row, mask) if m)
                sent.setdefault(tok.decode(ids), []).append(ids)
            return generate(*args, **kwargs)

        model.generate = recording
        policy = TransformersPolicy(TransformersPolicyConfig(model=str(model_dir), max_batch=16), model=model,
                                    tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir))
        verifier = OutcomeVerifier(OutcomeVerifierConfig(use_math_verify=False))
        engine = Engine(policy, verifier, PromptConfig(), seed=0, cache=cache, max_tokens=10)
        cfg = MCTSConfig(children=3, iterations=iterations, k=2, max_depth=4)
        asyncio.run(run_problem(engine, problem, cfg))
        return sent

    warm_cache = RolloutCache(tmp_path / "warm.sqlite")
    run(warm_cache, iterations=2)  # fills the cache with the first iterations' expansions and rollouts
    warm = run(warm_cache, iterations=5)
    cold = run(RolloutCache(tmp_path / "cold.sqlite"), iterations=5)
    assert warm and len(warm) < len(cold), "the warm run was served partly from the cache"
    assert set(warm) <= set(cold), "same seeds, same tree: the warm run asks for a subset of the prompts"
    opening = PromptConfig().render(problem.question, "")
    children = [text for text in warm if text.removeprefix(opening).count("\n") >= 1]
    assert children, "some prompts continue steps the warm run read from the cache"
    for text in warm:
        assert len(set(warm[text])) == 1 and set(warm[text]) == set(cold[text]), f"IDs differ for {text!r}"
    assert any(tok.convert_tokens_to_ids("ab") in ids for text in children for ids in warm[text])


def test_chat_template_from_the_tokenizer_renders_like_transformers(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    cfg = prompt_config_from_tokenizer(tok, system="Be brief.")
    question = "Q: 1+1"
    user = render_prompt(cfg, question, []).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    want_open = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(cfg, question, []) == want_open
    steps = ["1+1=2", "The answer is 2."]
    want = tok.apply_chat_template([*messages, {"role": "assistant", "content": "Step 1: 1+1=2\nStep 2: x"}],
                                   tokenize=False, continue_final_message=True)
    got = render_prompt(cfg, question, steps)
    assert got.startswith(want_open) and got == want.removesuffix("Step 2: x") + "Step 2: The answer is 2.\n"
    assert render_prompt(cfg, question, steps[:1]) == want_open + "Step 1: 1+1=2\n", "child extends parent"


def test_missing_extra_is_a_clear_error(monkeypatch):
    import builtins

    from storage.errors import PolicyError

    real = builtins.__import__

    def no_transformers(name, *a, **kw):
        if name == "transformers":
            raise ImportError("no transformers")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    pol = TransformersPolicy(TransformersPolicyConfig(model="nowhere"))
    with pytest.raises(PolicyError, match=r"stepforge\[transformers\]"):
        _run(pol, [GenerationRequest("x", SamplingParams())])


def _bos_tokenizer():
    """Like `_tokenizer`, plus a BOS that the tokenizer adds itself (as Llama's does) and a chat template that
    renders it too (`{{ bos_token }}`, as Llama 3's does)."""
    from tokenizers import processors

    tok = _tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.chat_template = "{{ bos_token }}" + CHATML
    return tok


def test_chat_prompts_rendered_with_bos_get_one_bos_not_two():
    from tasks.policy.prefix import BoundaryEncoder

    tok = _bos_tokenizer()
    bos = tok.bos_token_id
    assert tok.encode("Q", add_special_tokens=True)[0] == bos, "the tokenizer adds a BOS by itself"
    cfg = prompt_config_from_tokenizer(tok)
    prompt = render_prompt(cfg, "Q: 1+1", [])
    assert prompt.startswith("<s>")
    prefix = BoundaryEncoder(tok, ("\n",))
    ids = prefix.encode(prompt)
    # What transformers itself gives for the same chat: apply_chat_template tokenises without special tokens.
    assert list(ids) == tok(prompt, add_special_tokens=False)["input_ids"] and ids.count(bos) == 1
    child = prefix.encode(render_prompt(cfg, "Q: 1+1", ["1+1=2"]))
    assert child[: len(ids)] == ids and child.count(bos) == 1
    # A completion-family prompt carries no BOS text, so the tokenizer still adds its own.
    assert BoundaryEncoder(tok, ("\n",)).encode("Question: 1+1\n")[0] == bos


@pytest.mark.usefixtures("prefect_server")
def test_build_dataset_runs_the_transformers_backend_end_to_end_and_deterministically(small_config, tmp_path):
    from flows.build import build_dataset
    from storage.objectstore import open_store
    from storage.release import read_manifest, verify_release

    changes = dict(source={"num_problems": 4, "seed": 0}, shard_size=2, rollout_cache=False,
                   search={"algorithm": "math-shepherd", "num_solutions": 2, "k": 2},
                   generation={"max_tokens": 12, "temperature": 1.0},
                   # The synthetic prompts are ~300 characters, one token each with this tokenizer.
                   policy={"kind": "transformers", "max_batch": 16,
                           "model": str(_save_tiny_model(tmp_path / "tiny-lm-1k", n_positions=1024))})
    first = build_dataset(small_config(**changes))
    second = build_dataset(small_config(**changes, storage={"root": str(tmp_path / "again")}))
    assert first["steps"] > 0 and first["content_hash"] == second["content_hash"], "seeded per sample"
    store = open_store(str(tmp_path / "data"))
    assert verify_release(store, "demo", 1) == []
    manifest = read_manifest(store, "demo", 1)
    usage = manifest["stats"]["usage"]
    assert manifest["policy"].startswith("transformers/") and usage["requests"] == first["policy_requests"]
    assert usage["samples"] == first["rollouts"] and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_a_prompt_longer_than_the_context_is_a_clear_error_and_generation_stops_at_its_end(policy):
    from storage.errors import PolicyError

    prompt = "Q: " + "1+1=2. " * 40  # 283 tokens: more than the model's 256 positions
    with pytest.raises(PolicyError, match=r"does not fit the context .*\(256 tokens\)"):
        _run(policy, [GenerationRequest(prompt, SamplingParams(n=1, seed=0, max_tokens=8))])
    near_end = "Q: " + "1+1=2. " * 35 + "1+1="  # 252 tokens: room for 4
    (outs,) = _run(policy, [GenerationRequest(near_end, SamplingParams(n=2, seed=0, max_tokens=64))])
    assert all(o.completion_tokens <= 256 - o.prompt_tokens for o in outs)
    assert outs[0].prompt_tokens == len(near_end)


def test_a_sample_near_the_context_end_does_not_depend_on_its_batch(policy):
    short = GenerationRequest("Q: 1+1=", SamplingParams(n=1, seed=3, max_tokens=64))
    long = GenerationRequest("Q: " + "1+1=2. " * 35 + "1+1=", SamplingParams(n=1, seed=4, max_tokens=64))
    ((alone,),) = _run(policy, [short])
    (batched,), (cut,) = _run(policy, [short, long])
    assert batched.text == alone.text and batched.completion_tokens == alone.completion_tokens
    assert cut.completion_tokens <= 256 - cut.prompt_tokens
