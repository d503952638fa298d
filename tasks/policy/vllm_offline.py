"""vLLM offline engine backend (`vllm.LLM`), an optional extra: `pip install vllm` on a CUDA machine.

NOT RUN ON A GPU HERE: vLLM wheels are CUDA builds and no GPU or weights are available where stepforge
is developed, so this module is tested at its adapter boundary only (request building, token-ID prefix
extension, output parsing), with vLLM's own output types where vLLM is importable and look-alikes
otherwise.

What it does, and why:
- Automatic prefix caching on (`enable_prefix_caching=True`): children share their parent's prompt.
- `n = k` in one `SamplingParams` per prompt, never k copies of a prompt.
- Prompts are token IDs (`{"prompt_token_ids": ...}`) encoded piece by piece between step boundaries
  (`BoundaryEncoder`, as every backend does): a child's prompt is its parent's token IDs plus its own
  step's, so the prefix cache hits block for block, and the IDs are a function of the text alone, never of
  which requests came before (a rollout-cache hit cannot change a later prompt's IDs).
- Stop strings are kept in the output (`include_stop_str_in_output=True`) so that the matched stop string
  is known from the text; the text returned to the engine drops it again when the request did not ask for it.
- Log-probs of the sampled tokens (`logprobs=0`) and `num_cached_tokens` are recorded.
- One generation loop per process: `LLM` is not thread-safe, while Prefect runs shard tasks in threads.
  Every `VLLMPolicy` of a process hands its batches to one engine thread, which merges whatever is
  queued into one `LLM.generate` call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import PolicyError
from tasks.policy.base import Completion, GenerationRequest, PolicyUsage, default_policy_id
from tasks.policy.prefix import BoundaryEncoder


class VLLMPolicyConfig(BaseModel):
    """A model run in-process by vLLM's offline engine (needs vLLM and a GPU)."""

    model_config = ConfigDict(extra="forbid")
    # How fast it runs: left out of the build key and of the default policy id. Everything else, including
    # tensor_parallel_size and engine_args, is kept in: they can change the numerics, so the samples.
    noise_fields: ClassVar[tuple[str, ...]] = ("gpu_memory_utilization", "max_batch", "max_num_seqs")

    kind: Literal["vllm"] = "vllm"
    model: str = Field(..., min_length=1, description="Local folder or Hub id of the model.")
    tokenizer: str | None = Field(None, description="Tokenizer folder/id; default: `model`.")
    dtype: str = Field("auto", description="vLLM `dtype` (auto, bfloat16, float16).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=1, description="Context length cap (None: the model's).")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM scheduler batch size (None: vLLM default).")
    enable_prefix_caching: bool = Field(True, description="Automatic prefix caching; keep on: trees share prefixes.")
    max_batch: int = Field(1024, ge=1, description="Requests the scheduler may hand over in one call.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM `min_p` (0 disables).")
    top_k: int = Field(-1, description="vLLM `top_k` (-1 disables).")
    skip_special_tokens: bool = Field(True, description="Drop special tokens from output text.")
    policy_id: str | None = Field(None, description="Identity in cache keys; default `vllm/MODEL@HASH`, HASH over the "
                                  "other output-affecting fields (min_p, top_k, dtype, skip_special_tokens, "
                                  "engine_args, ...). Set it, and change it, when the weights behind `model` change.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="More `vllm.LLM(...)` keyword args.")


def sampling_kwargs(config: VLLMPolicyConfig, req: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request; pure."""
    p = req.params
    return {
        "n": p.n, "temperature": p.temperature, "top_p": p.top_p, "top_k": config.top_k, "min_p": config.min_p,
        "max_tokens": p.max_tokens, "stop": list(p.stop), "seed": p.seed,
        # Always keep the stop string: its tokens are part of the step the child prompt will extend with.
        "include_stop_str_in_output": True,
        "logprobs": 0 if p.logprobs else None,  # 0: only the sampled token's log-prob
        "skip_special_tokens": config.skip_special_tokens,
    }


class _EngineLoop:
    """The one thread per process that owns an `LLM` and runs `generate` on merged batches."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[dict[str, Any]], params: list[Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((prompts, params, fut))
        return fut

    def _run(self) -> None:
        while True:
            jobs = [self._q.get()]
            while True:  # merge everything queued meanwhile: one big batch keeps the GPU busy
                try:
                    jobs.append(self._q.get_nowait())
                except queue.Empty:
                    break
            prompts = [pr for job in jobs for pr in job[0]]
            params = [pa for job in jobs for pa in job[1]]
            try:
                outs = self.llm.generate(prompts, params, use_tqdm=False)
            except BaseException as exc:  # every waiter gets the error; none hangs
                for *_, fut in jobs:
                    fut.set_exception(exc)
                continue
            pos = 0
            for pr, _, fut in jobs:
                fut.set_result(outs[pos : pos + len(pr)])
                pos += len(pr)


_LOOPS: dict[str, _EngineLoop] = {}
_LOOPS_LOCK = threading.Lock()


def _engine_loop(config: VLLMPolicyConfig) -> _EngineLoop:
    key = config.model_dump_json(include={"model", "tokenizer", "dtype", "tensor_parallel_size", "max_model_len",
                                          "enable_prefix_caching", "engine_args"})
    with _LOOPS_LOCK:  # reserve the slot under the lock: two shards never start two engines
        if key not in _LOOPS:
            try:
                from vllm import LLM
            except ImportError as exc:
                raise PolicyError("`policy.kind=vllm` needs vLLM (a CUDA machine): pip install vllm; or serve the "
                                  "model with `vllm serve` and use `policy.kind=openai`.", field="policy.kind") from exc
            args: dict[str, Any] = {"model": config.model, "tokenizer": config.tokenizer, "dtype": config.dtype,
                                    "tensor_parallel_size": config.tensor_parallel_size,
                                    "gpu_memory_utilization": config.gpu_memory_utilization,
                                    "enable_prefix_caching": config.enable_prefix_caching}
            if config.max_model_len:
                args["max_model_len"] = config.max_model_len
            if config.max_num_seqs:
                args["max_num_seqs"] = config.max_num_seqs
            args.update(config.engine_args)
            _LOOPS[key] = _EngineLoop(LLM(**args))
        return _LOOPS[key]


def policy_id(cfg: VLLMPolicyConfig) -> str:
    """The policy's identity (rollout-cache keys, the nodes table) from its config alone."""
    return cfg.policy_id or default_policy_id(f"vllm/{cfg.model}", cfg)


class VLLMPolicy:
    def __init__(self, config: VLLMPolicyConfig, *, llm: Any = None, tokenizer: Any = None,
                 sampling_params: Callable[..., Any] | None = None, boundaries: Sequence[str] = ("\n",)) -> None:
        """`llm`, `tokenizer` and `sampling_params` are injected by tests; by default they come from vLLM."""
        self.config = config
        self.policy_id = policy_id(config)
        self.max_batch = config.max_batch
        self.usage = PolicyUsage()
        self._loop = _EngineLoop(llm) if llm is not None else None
        self._tokenizer = tokenizer
        self._sampling_params = sampling_params
        self._boundaries = boundaries
        self._encoder: BoundaryEncoder | None = None

    def _ensure(self) -> None:
        if self._loop is None:
            self._loop = _engine_loop(self.config)
        if self._tokenizer is None:
            self._tokenizer = self._loop.llm.get_tokenizer()
        if self._sampling_params is None:
            from vllm import SamplingParams

            self._sampling_params = SamplingParams
        if self._encoder is None:
            self._encoder = BoundaryEncoder(self._tokenizer, self._boundaries)

    def build_requests(self, requests: Sequence[GenerationRequest]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Token-ID prompts (a function of each prompt's text) and `SamplingParams`, one each per request."""
        self._ensure()
        assert self._encoder is not None and self._sampling_params is not None
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids if r.prompt_token_ids is not None
                                             else self._encoder.encode(r.prompt))} for r in requests]
        params = [self._sampling_params(**sampling_kwargs(self.config, r)) for r in requests]
        return prompts, params

    def parse_output(self, req: GenerationRequest, out: Any) -> list[Completion]:
        """Completions from one `vllm.RequestOutput`, in sample order."""
        prompt_ids = tuple(out.prompt_token_ids or ())
        cached = getattr(out, "num_cached_tokens", None)
        comps = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            text = o.text
            stop = o.stop_reason if isinstance(o.stop_reason, str) else None
            if stop is not None and text.endswith(stop) and not req.params.include_stop_str_in_output:
                text = text[: len(text) - len(stop)]
            lps = None
            if o.logprobs is not None:
                lps = [step[tid].logprob for step, tid in zip(o.logprobs, o.token_ids)]
            want = req.params.logprobs and lps is not None
            comps.append(Completion(
                text=text, finish_reason=o.finish_reason or "stop", prompt_tokens=len(prompt_ids),
                completion_tokens=len(o.token_ids), mean_logprob=(sum(lps) / len(lps) if lps else None) if want
                else None, token_logprobs=tuple(lps) if want else None, cached_tokens=cached, stop_reason=stop))
        self.usage.requests += 1
        self.usage.samples += len(comps)
        self.usage.prompt_tokens += len(prompt_ids)
        self.usage.completion_tokens += sum(c.completion_tokens for c in comps)
        self.usage.cached_tokens += cached or 0
        return comps

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        prompts, params = self.build_requests(requests)
        assert self._loop is not None
        outs = await asyncio.wrap_future(self._loop.submit(prompts, params))
        if len(outs) != len(requests):
            raise PolicyError(f"vLLM returned {len(outs)} outputs for {len(requests)} prompts")
        return [self.parse_output(r, o) for r, o in zip(requests, outs)]

    async def aclose(self) -> None:
        return None  # the engine outlives a shard: it is per process
