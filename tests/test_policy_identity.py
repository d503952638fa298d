"""Policy ids key the rollout cache: settings that change what is sampled must change the id, settings that
only change where or how fast requests go must not, and an explicit `policy_id` is kept as given."""

from __future__ import annotations

import pytest

from tasks.policy.hf_transformers import TransformersPolicy, TransformersPolicyConfig
from tasks.policy.openai_compat import OpenAIPolicy, OpenAIPolicyConfig
from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
from tasks.policy.vllm_offline import VLLMPolicy, VLLMPolicyConfig
from tasks.search.rollout_cache import cache_key

OPENAI = dict(base_url="http://a:1/v1", model="m")


def _oid(**changes) -> str:
    return OpenAIPolicy(OpenAIPolicyConfig(**{**OPENAI, **changes})).policy_id


def _vid(**changes) -> str:
    return VLLMPolicy(VLLMPolicyConfig(model="org/m", **changes), llm=object(), tokenizer=object()).policy_id


def _tid(**changes) -> str:
    return TransformersPolicy(TransformersPolicyConfig(model="/models/m", **changes)).policy_id


@pytest.mark.parametrize("change", [{"min_p": 0.1}, {"top_k": 20}, {"skip_special_tokens": False},
                                    {"extra_body": {"repetition_penalty": 1.1}}, {"vllm_extensions": False},
                                    {"add_special_tokens": True}, {"endpoint": "chat"}, {"model": "m2"}])
def test_openai_id_changes_with_what_is_sampled(change):
    assert _oid(**change) != _oid()
    # So `--set policy.min_p=0.1` never reads rollouts sampled without it.
    prompt, params = "Q", (4, 1.0, 1.0, 512, ("\n",), False, 7)
    assert cache_key(_oid(**change), prompt, params) != cache_key(_oid(), prompt, params)


@pytest.mark.parametrize("change", [{"base_url": "http://b:2/v1, http://c:3/v1"}, {"api_key_env": "OTHER"},
                                    {"max_concurrency": 3}, {"max_batch": 5}, {"timeout_s": 9.0},
                                    {"connect_timeout_s": 1.0}, {"max_retries": 0}, {"backoff_initial_s": 2.0},
                                    {"backoff_max_s": 3.0}, {"breaker_threshold": 2}, {"breaker_cooldown_s": 1.0},
                                    {"max_outage_s": 5.0}])
def test_openai_id_ignores_where_and_how_fast(change):
    assert _oid(**change) == _oid()


def test_default_ids_name_the_model_and_overrides_are_kept():
    assert _oid().startswith("openai:completions/m@") and len(_oid().split("@")[1]) == 8
    assert _oid(policy_id="my-model-2026-11") == "my-model-2026-11"
    assert _oid(policy_id="x", min_p=0.3) == "x"  # an explicit id is the user's promise; kept as given
    assert _vid().startswith("vllm/org/m@") and _tid().startswith("transformers//models/m@")
    assert _vid(policy_id="v") == "v" and _tid(policy_id="t") == "t"


def test_vllm_and_transformers_ids_follow_output_affecting_fields():
    for change in ({"min_p": 0.1}, {"top_k": 5}, {"dtype": "float16"}, {"skip_special_tokens": False},
                   {"engine_args": {"quantization": "fp8"}}, {"tokenizer": "other"}, {"max_model_len": 2048}):
        assert _vid(**change) != _vid(), change
    for change in ({"gpu_memory_utilization": 0.5}, {"max_batch": 8}, {"max_num_seqs": 16}):
        assert _vid(**change) == _vid(), change
    assert _tid(dtype="bfloat16") != _tid() and _tid(tokenizer="/t") != _tid()
    assert _tid(device="cuda:1") == _tid() and _tid(max_batch=4) == _tid()


def test_simulated_policy_id_is_unchanged():
    # Its id is its own (tasks/policy/simulated.py); data built with it keeps its `policy` column.
    assert SimulatedPolicy(SimulatedPolicyConfig()).policy_id == "simulated-arith/v1/err=0.1"
