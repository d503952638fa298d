"""transformers backend (CPU or GPU): batched `generate` with stop strings and log-probs, for small models
and for tests. Optional extra: `pip install 'stepforge[transformers]'`; this module imports without it.

Sampling is reproducible per sample whatever the batch: instead of `do_sample=True` (one global RNG for
the whole batch, so a sample would depend on its neighbours) each row gets Gumbel noise from its own
generator seeded by (request seed, sample index, position), and decoding takes the argmax. argmax(logits/T
+ Gumbel) is an exact sample of softmax(logits/T) (the Gumbel-max trick), so this is ordinary sampling,
batched, with the same answer whether a request runs alone or beside 50 others.

Log-probs are the model's raw log-softmax of the chosen token (before temperature), as vLLM reports them.
Prompts are encoded piece by piece between step boundaries (`BoundaryEncoder`, as every backend does): the
IDs are a function of the text alone, so a child's prompt extends its parent's IDs and a run served from
the rollout cache sends exactly the IDs a cold run sends.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import PolicyError
from tasks.policy.base import Completion, GenerationRequest, PolicyUsage, apply_stop, default_policy_id, derive_seed
from tasks.policy.prefix import BoundaryEncoder


class TransformersPolicyConfig(BaseModel):
    """A local Hugging Face model run with `transformers` (needs the `transformers` extra)."""

    model_config = ConfigDict(extra="forbid")
    # Where and how fast it runs: left out of the build key and of the default policy id.
    noise_fields: ClassVar[tuple[str, ...]] = ("device", "max_batch")

    kind: Literal["transformers"] = "transformers"
    model: str = Field(..., min_length=1, description="Local folder (or Hub id, where the Hub is reachable).")
    tokenizer: str | None = Field(None, description="Tokenizer folder/id; default: `model`.")
    device: str = Field("cpu", description="`cpu`, `cuda`, `cuda:1`, `mps`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    max_batch: int = Field(32, ge=1, description="Sequences (prompts × n) per `generate` call.")
    policy_id: str | None = Field(None, description="Identity in cache keys; default `transformers/MODEL@HASH`, HASH over "
                                  "the other output-affecting fields (dtype, tokenizer, ...). Set it, and change "
                                  "it, when the weights in the `model` folder change.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")


def _seed(*parts: Any) -> int:
    return derive_seed(*parts, bits=63)  # torch.Generator.manual_seed takes a signed 64-bit value


def policy_id(cfg: TransformersPolicyConfig) -> str:
    """The policy's identity (rollout-cache keys, the nodes table) from its config alone."""
    return cfg.policy_id or default_policy_id(f"transformers/{cfg.model}", cfg)


class TransformersPolicy:
    def __init__(self, config: TransformersPolicyConfig, *, model: Any = None, tokenizer: Any = None,
                 boundaries: Sequence[str] = ("\n",)) -> None:
        self.config = config
        self.policy_id = policy_id(config)
        self.max_batch = max(1, config.max_batch)
        self.usage = PolicyUsage()
        self._model, self._tok = model, tokenizer
        self._boundaries = boundaries
        self._encoder: BoundaryEncoder | None = None
        self._lock = threading.Lock()  # one generate at a time: the model is not shared across threads

    def _load(self) -> None:
        if self._model is not None and self._encoder is not None:
            return
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError as exc:
            raise PolicyError("`policy.kind=transformers` needs torch and transformers: "
                              "pip install 'stepforge[transformers]'", field="policy.kind") from exc
        c = self.config
        if self._tok is None:
            self._tok = transformers.AutoTokenizer.from_pretrained(c.tokenizer or c.model,
                                                                   trust_remote_code=c.trust_remote_code)
        if self._model is None:
            self._model = transformers.AutoModelForCausalLM.from_pretrained(
                c.model, dtype=c.dtype, trust_remote_code=c.trust_remote_code).to(c.device)
        self._model.eval()
        tok = self._tok
        tok.padding_side = "left"  # decoder-only batching: prompts end where generation starts
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        self._encoder = BoundaryEncoder(tok, self._boundaries)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        # Generation blocks; run it off the event loop so other shards' coroutines keep moving.
        return await asyncio.to_thread(self._generate_sync, list(requests))

    async def aclose(self) -> None:
        return None

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        with self._lock:
            self._load()
            assert self._encoder is not None
            ids = [tuple(r.prompt_token_ids) if r.prompt_token_ids is not None else self._encoder.encode(r.prompt)
                   for r in requests]
            results: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
            # Rows of one generate call share the token limit and stop strings; group by them. The limit is
            # each row's own (its prompt and the context), so a sample never depends on what it is batched
            # with: rows at the full max_tokens all fit (width + max_tokens <= context), and rows cut by the
            # context share one prompt length.
            groups: dict[tuple, list[tuple[int, int]]] = {}
            for ri, r in enumerate(requests):
                p = r.params
                key = (self._fit_context(len(ids[ri]), p.max_tokens), p.stop, p.temperature, p.top_p)
                groups.setdefault(key, []).extend((ri, si) for si in range(p.n))
            for key, rows in groups.items():
                for start in range(0, len(rows), self.max_batch):
                    chunk = rows[start : start + self.max_batch]
                    outs = self._run_chunk([ids[ri] for ri, _ in chunk], [requests[ri] for ri, _ in chunk],
                                           [si for _, si in chunk], max_new=key[0])
                    for (ri, si), comp in zip(chunk, outs):
                        results[ri][si] = comp
            final: list[list[Completion]] = []
            for r, prompt_ids, outs in zip(requests, ids, results):
                self.usage.requests += 1
                self.usage.samples += len(outs)
                self.usage.prompt_tokens += len(prompt_ids)
                self.usage.completion_tokens += sum(o.completion_tokens for o in outs)
                final.append(list(outs))
            return final

    def _run_chunk(self, prompt_ids: list[tuple[int, ...]], reqs: list[GenerationRequest],
                   sample_idx: list[int], max_new: int) -> list[Completion]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        tok, model = self._tok, self._model
        p = reqs[0].params
        width = max(len(x) for x in prompt_ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in prompt_ids], dtype=torch.long)
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], dtype=torch.long)
        device = model.device
        seeds = [_seed(r.params.seed, si) for r, si in zip(reqs, sample_idx)]

        class _GumbelMax(LogitsProcessor):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                if p.temperature == 0:
                    return scores  # greedy
                step = input_ids.shape[1] - width
                logits = scores.float() / p.temperature
                if p.top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
                    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                    drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token crossing p
                    logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
                noise = torch.empty_like(logits)
                for row, seed in enumerate(seeds):
                    g = torch.Generator(device="cpu").manual_seed(_seed(seed, step))
                    u = torch.rand(logits.shape[-1], generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
                    noise[row] = (-torch.log(-torch.log(u))).to(logits.dtype).to(logits.device)
                return logits + noise

        kwargs: dict[str, Any] = {}
        if p.stop:
            kwargs.update(stop_strings=list(p.stop), tokenizer=tok)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attn.to(device), do_sample=False,
                max_new_tokens=max_new, logits_processor=LogitsProcessorList([_GumbelMax()]),
                pad_token_id=pad, eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True,
                num_beams=1, temperature=None, top_p=None, top_k=None, **kwargs)
        gen = out.sequences[:, width:].tolist()
        logps = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)  # raw model distribution
        completions = []
        for row, (req, tokens) in enumerate(zip(reqs, gen)):
            completions.append(self._finish(req, prompt_ids[row], tokens, logps[row]))
        return completions

    def context_length(self) -> int | None:
        """The model's context in tokens (positions it has embeddings for), None when it does not say."""
        cfg = getattr(self._model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _fit_context(self, prompt_len: int, max_tokens: int) -> int:
        """New tokens that fit after a `prompt_len`-token prompt: like vLLM, a completion stops at the
        context's end (finish "length"); a prompt that leaves no room is an error, not an empty sample."""
        ctx = self.context_length()
        if ctx is None:
            return max_tokens
        if prompt_len >= ctx:
            raise PolicyError(
                f"A prompt of {prompt_len} tokens does not fit the context of {self.config.model!r} ({ctx} "
                "tokens): use a model with a longer context, a shorter prompt template (`prompt.template`) or "
                "fewer steps per problem.", field="policy.model", value=self.config.model)
        return min(max_tokens, ctx - prompt_len)

    def _finish(self, req: GenerationRequest, prompt_ids: tuple[int, ...], tokens: list[int], logps: Any) -> Completion:
        tok, p = self._tok, req.params
        eos = tok.eos_token_id
        # Where this row really ended: at EOS, or at the first token that completes a stop string;
        # the rest of the row is padding from the batch.
        n = len(tokens)
        finish = "length"
        if eos is not None and eos in tokens:  # EOS counts as generated (as in vLLM), its text is empty
            n, finish = tokens.index(eos) + 1, "stop"
        text = tok.decode(tokens[:n], skip_special_tokens=True)
        cut_text, _, matched = apply_stop(text, p.stop, p.include_stop_str_in_output)
        if matched is not None:
            finish = "stop"
            lo, hi = 1, n  # smallest k whose decoded text holds the stop string (monotonic in k)
            while lo < hi:
                mid = (lo + hi) // 2
                if matched in tok.decode(tokens[:mid], skip_special_tokens=True):
                    hi = mid
                else:
                    lo = mid + 1
            n = lo
        lps = [float(logps[i, t]) for i, t in enumerate(tokens[:n])]
        return Completion(
            text=cut_text, finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=n,
            mean_logprob=(sum(lps) / len(lps) if lps else None) if p.logprobs else None,
            token_logprobs=tuple(lps) if p.logprobs else None, stop_reason=matched)
