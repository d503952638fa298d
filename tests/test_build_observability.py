"""What a build looks like from the Prefect UI and its logs: the run's name, one log line per finished shard,
the summary line, the label distribution as an image, and per-build rates in the manifest and the summary
(which never reach the content hash)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re

import pytest

from flows.build import build_dataset, build_run_name
from flows.config import BuildConfig
from flows.summary import summary_rows
from storage.objectstore import open_store
from storage.release import read_manifest
from tasks.stats import BuildStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_run_name_says_dataset_algorithm_and_size():
    assert build_run_name(BuildConfig()) == "build demo (math-shepherd, 128 problems)"
    cfg = BuildConfig.model_validate({"dataset": "gsm", "source": {"kind": "file", "path": "x.jsonl", "limit": 500},
                                      "search": {"algorithm": "omegaprm"}})
    assert build_run_name(cfg) == "build gsm (omegaprm, file, 500 problems)"
    assert build_run_name({"dataset": "gsm", "source": {"kind": "file", "path": "x.jsonl"}}) == \
        "build gsm (math-shepherd, file)"
    # A config the flow will reject still names the run; the run then fails with the config's own error.
    assert build_run_name({"dataset": "demo", "shard_size": 0}) == "build (invalid config)"


def test_rates_divide_the_counters_and_say_none_where_there_is_nothing_to_divide():
    stats = BuildStats(rollouts=300, cache_hits=25, policy_requests=75, usage={"completion_tokens": 6000},
                       verifications=200, timeout_verdicts=5, verify_batches=4, batched_verdicts=40, verify_seconds=0.2,
                       verify_fast_calls=50, fast_verdicts=120)
    rates = stats.rates(3.0)
    assert rates["rollouts_per_s"] == 100.0 and rates["completion_tokens_per_s"] == 2000.0
    assert rates["cache_hit_rate"] == 0.25 and rates["verifier_timeout_rate"] == 0.025
    # Per batch call, the fast path's 50 calls left out: 40 verdicts in 4 batches; 120 of the 160 fresh
    # verdicts came from the fast path (the other 40 of the 200 were memo re-reads, no verifier call at all).
    assert rates["verifier_latency_ms"] == 50.0 and rates["verdicts_per_verifier_call"] == 10.0
    assert rates["fast_path_share"] == 0.75
    assert set(BuildStats().rates(0.0).values()) == {None}


def test_the_engine_counts_verifier_timeouts_and_times_its_verifier_calls():
    import slow_checks
    from tasks.policy.simulated import SimulatedPolicy, SimulatedPolicyConfig
    from tasks.prompt import PromptConfig
    from tasks.search.engine import Engine
    from verifiers.base import OutcomeItem, Status
    from verifiers.outcome import OutcomeVerifier, OutcomeVerifierConfig

    prompt = PromptConfig()
    verifier = OutcomeVerifier(OutcomeVerifierConfig(workers=1, timeout_s=0.5), slow_check=slow_checks.sleeps_forever)
    engine = Engine(SimulatedPolicy(SimulatedPolicyConfig(), prompt.step_format), verifier, prompt, seed=0)
    items = [OutcomeItem(r"\boxed{\sqrt{2}}", r"2^{1/2}"), OutcomeItem("The answer is 4.", "4")]

    async def go():
        try:
            return await engine.verify(items)
        finally:
            await verifier.aclose()

    verdicts = asyncio.run(go())
    assert [v.status for v in verdicts] == [Status.TIMEOUT, Status.VALID]
    s = engine.stats
    # Two verifier calls: the fast path (`verify_now`, both items; it decides the second), then one batch
    # with the first, which Math-Verify has to decide. Only the second is a batch call.
    assert (s.verifications, s.timeout_verdicts, s.undecided_verdicts) == (2, 1, 1)
    assert (s.verify_fast_calls, s.fast_verdicts, s.verify_batches, s.batched_verdicts) == (1, 1, 1, 1)
    assert s.verify_seconds >= 0.5  # the batch waited out the timeout


@pytest.fixture
def run_logs(prefect_server):
    """Let the run loggers' INFO records through to the API (the test session logs at WARNING)."""
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    yield
    for lg, level in zip(loggers, before):
        lg.setLevel(level)


def _logs_of(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]


def test_a_build_names_its_run_logs_each_shard_and_its_summary_and_draws_its_labels(run_logs, small_config, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = small_config(dataset="observed")
    state = build_dataset(cfg, return_state=True)
    summary = state.result()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        (image,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["observed-label-distribution"])))
    assert run.name == "build observed (math-shepherd, 24 problems)"

    messages = _logs_of(run_id)
    shard_lines = [m for m in messages if re.match(r"shard \d+/3 done", m)]
    assert sorted(int(re.match(r"shard (\d+)", m).group(1)) for m in shard_lines) == [1, 2, 3]
    for m in shard_lines:
        assert re.search(r"done in [\d.]+ s: 8 problems, \d+ steps, \d+ rollouts", m), m
    steps_logged = sum(int(re.search(r"(\d+) steps", m).group(1)) for m in shard_lines)
    assert steps_logged == summary["steps"]
    (final,) = [m for m in messages if m.startswith("committed ")]
    assert f"observed v1 (content hash {summary['content_hash'][:16]})" in final
    assert f"{summary['steps']} steps" in final and f"{summary['rollouts']} rollouts" in final

    # The label distribution as a PNG embedded in a markdown artifact: self-contained, nothing to host.
    assert image.type == "markdown"
    data = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", image.data)
    png = base64.b64decode(data.group(1))
    assert png.startswith(PNG_MAGIC) and len(png) > 5000

    manifest = read_manifest(open_store(str(tmp_path / "data")), "observed", 1)
    rates = manifest["rates"]
    assert rates == summary["rates"]
    assert rates["rollouts_per_s"] > 0 and rates["completion_tokens_per_s"] > 0
    assert rates["cache_hit_rate"] == 0.0 and rates["verifier_timeout_rate"] == 0.0
    # Synthetic answers are plain numbers: the fast path decides every one, so no batch reaches the verifier
    # and the per-batch-call rates have nothing to divide (they once counted each fast-path call as a batch
    # and read ~10 verdicts per call). Batch-call counting: the engine test above.
    stats = manifest["stats"]
    assert stats["fast_verdicts"] > stats["verify_fast_calls"] > 0
    assert (stats["verify_batches"], stats["batched_verdicts"]) == (0, 0)
    assert rates["fast_path_share"] == 1.0
    assert rates["verifier_latency_ms"] is None and rates["verdicts_per_verifier_call"] is None
    rows = dict(summary_rows(summary))
    assert "rollouts/s" in rows["rates"] and "cache hit rate 0.0%" in rows["rates"]
    assert rows["verifier"] == "n/a ms per batch call (n/a verdicts each), 100.0% decided on the fast path, " \
        "timeout rate 0.00%"


def test_rates_never_reach_the_content_hash_and_a_rebuild_reports_its_cache_hits(prefect_server, small_config):
    first = build_dataset(small_config(dataset="rated"))
    second = build_dataset(small_config(dataset="rated"))  # same config: every rollout from the cache
    assert second["version"] == 2 and second["content_hash"] == first["content_hash"]
    assert first["rates"]["cache_hit_rate"] == 0.0 and second["rates"]["cache_hit_rate"] == 1.0
    assert second["rollouts"] == 0 and second["rates"]["rollouts_per_s"] == 0.0
