"""The vLLM offline backend at its adapter boundary: request building (n = k, stop kept, seeds, log-probs),
token-ID prefix extension, output parsing, and one engine loop per process. vLLM itself (CUDA) is not run
here; vLLM's own output types are used where vLLM is importable, look-alikes with the same fields otherwise."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any

from tasks.policy.base import GenerationRequest, SamplingParams
from tasks.policy.vllm_offline import VLLMPolicy, VLLMPolicyConfig, sampling_kwargs

try:  # pragma: no cover - only where vLLM installs
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sequence import Logprob
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

    @dataclass
    class Logprob:  # type: ignore[no-redef]
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None

    @dataclass
    class CompletionOutput:  # type: ignore[no-redef]
        index: int
        text: str
        token_ids: list[int]
        cumulative_logprob: float | None
        logprobs: list[dict[int, Logprob]] | None
        finish_reason: str | None = None
        stop_reason: int | str | None = None

    @dataclass
    class RequestOutput:  # type: ignore[no-redef]
        request_id: str
        prompt: str | None
        prompt_token_ids: list[int]
        prompt_logprobs: Any
        outputs: list[CompletionOutput]
        finished: bool
        num_cached_tokens: int | None = None


class CharTokenizer:
    """One token per character (ids = code points + 10), BOS = 1: enough to check ID arithmetic exactly."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) + 10 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


class FakeParams:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeLLM:
    """Writes `Step <d>: x<seed>.` per call, honours stop strings like vLLM, simulates prefix caching."""

    def __init__(self, overrun: bool = False) -> None:
        self.calls: list[tuple[list, list]] = []
        self.seen: list[list[int]] = []
        self._busy = threading.Lock()
        self.overrun = overrun  # the last token runs past the stop string ("\n\n" for stop "\n")

    def get_tokenizer(self) -> CharTokenizer:
        return CharTokenizer()

    def generate(self, prompts, params, use_tqdm=False):
        assert self._busy.acquire(blocking=False), "LLM.generate re-entered from two threads"
        try:
            self.calls.append((prompts, params))
            return [self._one(i, pr["prompt_token_ids"], pa) for i, (pr, pa) in enumerate(zip(prompts, params))]
        finally:
            self._busy.release()

    def _one(self, i: int, ids: list[int], p: FakeParams) -> RequestOutput:
        tok = CharTokenizer()
        cached = max((_common(ids, s) for s in self.seen), default=0)
        self.seen.append(ids)
        depth = tok.decode(ids).count("Step ") + 1
        outs = []
        for j in range(p.n):
            full = f"Step {depth}: x{p.seed}-{j}.\nmore"
            stop = next((s for s in p.stop if s in full), None)
            text = full[: full.index(stop) + len(stop)] if stop else full
            token_ids = tok.encode(text + ("\n" if self.overrun and stop else ""), add_special_tokens=False)
            if not p.include_stop_str_in_output and stop:
                text = text[: -len(stop)]
            lps = [{t: Logprob(logprob=-0.25)} for t in token_ids] if p.logprobs is not None else None
            outs.append(CompletionOutput(index=j, text=text, token_ids=token_ids, cumulative_logprob=None,
                                         logprobs=lps, finish_reason="stop" if stop else "length", stop_reason=stop))
        return RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=ids, prompt_logprobs=None,
                             outputs=list(reversed(outs)), finished=True, num_cached_tokens=cached)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _policy(llm: FakeLLM | None = None) -> VLLMPolicy:
    llm = llm or FakeLLM()
    return VLLMPolicy(VLLMPolicyConfig(model="m", min_p=0.05), llm=llm, tokenizer=CharTokenizer(),
                      sampling_params=FakeParams)


def test_sampling_params_use_n_keep_stop_strings_and_ask_for_logprobs():
    cfg = VLLMPolicyConfig(model="m", top_k=20)
    req = GenerationRequest("p", SamplingParams(n=8, seed=3, stop=("\n",), logprobs=True, temperature=0.7))
    kw = sampling_kwargs(cfg, req)
    assert kw == {"n": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 20, "min_p": 0.0, "max_tokens": 512,
                  "stop": ["\n"], "seed": 3, "include_stop_str_in_output": True, "logprobs": 0,
                  "skip_special_tokens": True}
    assert sampling_kwargs(cfg, GenerationRequest("p", SamplingParams()))["logprobs"] is None
    if HAVE_VLLM:  # pragma: no cover
        from vllm import SamplingParams as VSP

        VSP(**kw)  # vLLM accepts every field


def test_child_prompts_extend_the_parent_token_ids_and_hit_the_prefix_cache():
    llm = FakeLLM()
    pol = _policy(llm)
    root = "Question: q\nAnswer:\n"
    first = asyncio.run(pol.generate([GenerationRequest(root, SamplingParams(n=2, seed=5, stop=("\n",),
                                                                             logprobs=True))]))[0]
    assert [c.text for c in first] == ["Step 1: x5-0.", "Step 1: x5-1."], "sample order, stop string dropped"
    assert first[0].token_logprobs == (-0.25,) * 14 and first[0].completion_tokens == 14  # stop token counted
    # The engine renders the child as parent + step + separator; its IDs are the parent's plus the step's.
    child = root + first[0].text + "\n"
    prompts, params = pol.build_requests([GenerationRequest(child, SamplingParams(n=4, seed=6))])
    parent_ids = llm.calls[0][0][0]["prompt_token_ids"]
    gen_ids = CharTokenizer().encode(first[0].text + "\n", add_special_tokens=False)
    assert prompts[0]["prompt_token_ids"] == parent_ids + gen_ids
    assert params[0].n == 4 and params[0].include_stop_str_in_output is True
    outs = asyncio.run(pol.generate([GenerationRequest(child, SamplingParams(n=4, seed=6, stop=("\n",)))]))[0]
    assert len(outs) == 4 and len(llm.calls) == 2 and len(llm.calls[1][0]) == 1, "one prompt with n=4"
    assert outs[0].cached_tokens == len(parent_ids) and pol.usage.cached_tokens == len(parent_ids)
    # A grandchild several steps deep still extends exactly (text the engine re-rendered matches the IDs).
    grand = child + outs[0].text + "\n" + "Step 3: written by hand\n"
    ids = pol.build_requests([GenerationRequest(grand, SamplingParams())])[0][0]["prompt_token_ids"]
    assert ids == CharTokenizer().encode(grand)


def test_stop_string_kept_when_asked_and_accounting_adds_up():
    pol = _policy()
    reqs = [GenerationRequest(f"Q{i}\n", SamplingParams(n=3, seed=i, stop=("\n",), include_stop_str_in_output=True))
            for i in range(3)]
    outs = asyncio.run(pol.generate(reqs))
    assert all(c.text.endswith(".\n") and c.stop_reason == "\n" and c.token_logprobs is None
               for group in outs for c in group)
    u = pol.usage
    assert (u.requests, u.samples) == (3, 9)
    assert u.completion_tokens == sum(c.completion_tokens for g in outs for c in g)
    assert u.prompt_tokens == sum(len(CharTokenizer().encode(r.prompt)) for r in reqs)


def test_no_reuse_when_the_last_token_runs_past_the_stop():
    llm = FakeLLM(overrun=True)
    pol = _policy(llm)
    out = asyncio.run(pol.generate([GenerationRequest("Q\n", SamplingParams(n=1, seed=1, stop=("\n",)))]))[0][0]
    child = "Q\n" + out.text + "\n"
    ids = pol.build_requests([GenerationRequest(child, SamplingParams())])[0][0]["prompt_token_ids"]
    assert CharTokenizer().decode(ids) == child, "the overrun token is not reused; the text is re-tokenised"


def test_one_engine_loop_per_process(monkeypatch):
    made: list[FakeLLM] = []

    def make_llm(**kwargs):
        assert kwargs["enable_prefix_caching"] is True
        made.append(FakeLLM())
        return made[-1]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=make_llm, SamplingParams=FakeParams))
    monkeypatch.setattr("tasks.policy.vllm_offline._LOOPS", {})
    cfg = VLLMPolicyConfig(model="shared")
    policies = [VLLMPolicy(cfg) for _ in range(4)]
    results: list[Any] = [None] * 4

    def shard(i: int) -> None:  # Prefect runs shard tasks in threads, each with its own event loop
        reqs = [GenerationRequest(f"Q{i}-{j}\n", SamplingParams(n=2, seed=j, stop=("\n",))) for j in range(5)]
        results[i] = asyncio.run(policies[i].generate(reqs))

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(made) == 1, "one LLM per process"
    assert all(len(r) == 5 and all(len(g) == 2 for g in r) for r in results)
    assert sum(len(p) for p, _ in made[0].calls) == 20  # every prompt once (FakeLLM asserts no re-entry)


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer whose BOS (id 1) is also written as text `^` by a chat template (`{{ bos_token }}`)."""

    bos_token = "^"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = [1] if text.startswith("^") else []  # the rendered BOS text is the BOS token
        body += [ord(c) + 10 for c in text[len(body):]]
        return ([1] if add_special_tokens else []) + body


def test_a_prompt_rendered_with_its_bos_gets_no_second_one():
    pol = VLLMPolicy(VLLMPolicyConfig(model="m"), llm=FakeLLM(), tokenizer=BosCharTokenizer(),
                     sampling_params=FakeParams)
    chat, plain = "^<user>q</user><assistant>", "Question: q\n"
    ids = pol.build_requests([GenerationRequest(chat, SamplingParams()), GenerationRequest(plain, SamplingParams())])[0]
    assert ids[0]["prompt_token_ids"][:2] == [1, ord("<") + 10], "one BOS, from the template"
    assert ids[1]["prompt_token_ids"][:2] == [1, ord("Q") + 10], "no BOS text: the tokenizer adds it"


def test_policy_id_hashes_sampling_settings():
    assert _policy().policy_id != VLLMPolicy(VLLMPolicyConfig(model="m"), llm=FakeLLM()).policy_id  # min_p
    assert _policy().policy_id.startswith("vllm/m@")


def test_prompt_ids_are_a_function_of_the_text_not_of_what_was_generated_before():
    """A model may write a text with other token IDs than encoding that text gives (unmerged pieces); a
    child's prompt IDs must not depend on whether its parent was generated here or read from the rollout
    cache, so they are always the encoding of the text."""

    class WritesOtherIds(FakeLLM):
        def _one(self, i, ids, p):
            out = super()._one(i, ids, p)
            for o in out.outputs:
                o.token_ids = [t + 990 for t in o.token_ids]  # the same characters under other IDs
            return out

    class Tok(CharTokenizer):
        def decode(self, ids, skip_special_tokens: bool = True) -> str:
            return "".join(chr(i - 1000 if i >= 1000 else i - 10) for i in ids if i >= 10)

    def policy() -> VLLMPolicy:
        return VLLMPolicy(VLLMPolicyConfig(model="m"), llm=WritesOtherIds(), tokenizer=Tok(), sampling_params=FakeParams)

    root = "Question: q\nAnswer:\n"
    warm = policy()
    step = asyncio.run(warm.generate([GenerationRequest(root, SamplingParams(n=1, seed=5, stop=("\n",)))]))[0][0]
    child = root + step.text + "\n"
    warm_ids = warm.build_requests([GenerationRequest(child, SamplingParams())])[0][0]["prompt_token_ids"]
    cold_ids = policy().build_requests([GenerationRequest(child, SamplingParams())])[0][0]["prompt_token_ids"]
    assert warm_ids == cold_ids == Tok().encode(child)
