"""The `build_dataset` Prefect flow: plan shards, stage their inputs, run them (one task each, cached),
commit (release + catalog), report.

Tasks pass storage keys, not tables. A shard task is cached on (shard content, build config) with its
result persisted, and also journals its output in staging, so a rerun after a crash skips every
finished shard; the commit is one task at the end, so a failed build leaves nothing visible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import subprocess
import threading
import time
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait

from flows import progress, shared_cache
from flows.components import (load_source, make_formal_labeller, make_policy, make_rollout_cache,
                              make_step_verifiers, make_verifier, open_config_store, policy_id)
from flows.config import BuildConfig
from flows.plots import label_distribution_markdown
from flows.runners import api_for_workers, check_runner, make_task_runner, runs_in_this_process
from flows.summary import render_card, render_summary_markdown, summary_line
from storage.exports.labels import consensus_counts, consensus_from_counts
from storage.errors import ConfigError, SourceError
from storage.lease import hold_staging
from storage.names import check_dataset_name
from storage.objectstore import ObjectStore
from storage.release import stage_key, stage_shard, staged_shard, write_parquet
from storage.schema import content_id, to_table
from storage.secrets import recorded_config
from tasks import filters
from tasks.problem import Problem
from tasks.search.engine import Engine
from tasks.shard import ShardResult, run_shard
from tasks.sources.base import SourceResult
from tasks.stats import BuildStats


def _stats_key(config: BuildConfig, build_key: str, shard_key: str) -> str:
    return stage_key(config.dataset, build_key, shard_key, "stats").removesuffix(".parquet") + ".json"


def _shard_cache_key(_context: Any, params: dict[str, Any]) -> str:
    cfg: BuildConfig = params["config"]
    return "stepforge-shard-" + content_id(cfg.storage.root, cfg.dataset, params["build_key"], params["shard_key"])


@task(name="run-shard", task_run_name="shard-{index}", cache_key_fn=_shard_cache_key, persist_result=True)
def run_shard_task(config: BuildConfig, build_key: str, shard_key: str, index: int) -> BuildStats:
    store = open_config_store(config)
    stats_key = _stats_key(config, build_key, shard_key)
    if staged_shard(store, config.dataset, build_key, shard_key) is not None:  # journal: done before a crash
        return BuildStats.from_dict(json.loads(store.read_bytes(stats_key)))
    raw = store.read_bytes(stage_key(config.dataset, build_key, shard_key, "input"))
    problems = [Problem.from_row(r) for r in pq.read_table(io.BytesIO(raw)).to_pylist()]
    with _policy_slot(config.concurrency.policy_slots):
        t0 = time.perf_counter()
        result = asyncio.run(_run(config, problems, store))
        result.stats.seconds = round(time.perf_counter() - t0, 3)
    result.stats.consensus = consensus_counts(result.tables["steps"])  # where MC, judge and checks agree
    store.write_bytes(stats_key, json.dumps(result.stats.to_dict(), sort_keys=True).encode())
    stage_shard(store, config.dataset, build_key, shard_key, result.tables)
    return result.stats


@contextmanager
def _policy_slot(name: str | None) -> Iterator[None]:
    """One slot of a Prefect global concurrency limit for the shard's lifetime (none when unset). Strict:
    a misspelt limit name would otherwise silently limit nothing."""
    with ExitStack() as stack:
        if name is not None:
            from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
            from prefect.concurrency.sync import concurrency

            try:
                # Strict about the limit existing, not about lease renewals: a short API outage must not
                # cancel a shard that already holds its slot.
                stack.enter_context(concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False))
            except ConcurrencySlotAcquisitionError as exc:
                if (err := _missing_limit(exc, name, "concurrency.policy_slots")) is None:
                    raise  # the server failed to answer: not a config mistake
                raise err from exc
        yield


def _missing_limit(exc: Exception, name: str, field: str) -> ConfigError | None:
    """The config error naming `field` when a slot could not be taken because the limit `name` does not
    exist (a misspelt name); None for any other failure."""
    if "must be created" not in str(exc):
        return None
    return ConfigError(f"`{field}`: no Prefect global concurrency limit named {name!r}; create it with "
                       f"`prefect gcl create {name} --limit N`.", field=field, value=name)


def _lean_slot(name: str | None) -> Any:
    """An async context manager factory holding one slot of the Prefect global concurrency limit `name` for
    one batch of Lean checks (None: no limit). Strict like `_policy_slot`: a misspelt name fails the shard
    with a config error instead of silently limiting nothing."""
    if name is None:
        return None

    @asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency

        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False))
            except ConcurrencySlotAcquisitionError as exc:
                if (err := _missing_limit(exc, name, "concurrency.lean_slots")) is None:
                    raise  # the server failed to answer: not a config mistake
                raise err from exc
            yield

    return slot


class _SlottedVerifier:
    """An outcome verifier whose every batch holds one slot (the Lean slots, for `verifier.kind=lean`)."""

    def __init__(self, inner: Any, slot: Any) -> None:
        self.inner, self.slot = inner, slot
        self.name, self.version = inner.name, inner.version

    async def verify(self, batch: Any) -> Any:
        async with self.slot():
            return await self.inner.verify(batch)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _run(config: BuildConfig, problems: list[Problem], store: ObjectStore | None = None) -> ShardResult:
    policy = make_policy(config)
    verifier = make_verifier(config)
    lean_slot = _lean_slot(config.concurrency.lean_slots)
    if lean_slot is not None and config.verifier.kind == "lean":  # the formal domain's rollouts go to Lean too
        verifier = _SlottedVerifier(verifier, lean_slot)
    step_verifiers = make_step_verifiers(config)
    formal = make_formal_labeller(config, lean_slot)
    cache = make_rollout_cache(config)
    if cache is not None and store is not None:  # rollouts other machines made on this root: cache hits here
        shared_cache.pull(store, cache)
    engine = Engine(policy, verifier, config.prompt, seed=config.seed, cache=cache,
                    temperature=config.generation.temperature, max_tokens=config.generation.max_tokens)
    try:
        result = await run_shard(problems, engine, config.search, budget=config.budget, pairs=config.pairs,
                                 on_problem_done=progress.advance, step_verifiers=step_verifiers, formal=formal,
                                 pseudo_gold=config.pseudo_gold)
        result.stats.usage = policy.usage.as_dict()
        if cache is not None and store is not None:  # this shard's new rollouts, for every other machine
            shared_cache.push(store, cache)
        return result
    finally:
        await policy.aclose()
        await verifier.aclose()
        await step_verifiers.aclose()
        if formal is not None:
            await formal.aclose()
        if cache is not None:
            cache.close()


@task(name="commit-release", retries=2, retry_delay_seconds=[1, 5])
def commit_task(config: BuildConfig, build_key: str, shard_keys: list[str], manifest_fields: dict[str, Any],
                commit_token: str | None = None, staging_holder: str | None = None) -> dict:
    """Commit the staged shards, sync the catalog, release staging, emit the event; safe to retry as a whole.

    ``staging_holder`` is this build's staging lease: it is dropped here, and the staging folder removed
    only when no other build of the same config still holds it (``storage.lease``).

    The commit is idempotent per run: its token (default: this flow run's id, which stays the same across
    task retries and flow retries) goes into the claim and the manifest, so a retry after a failure past the
    manifest (catalog sync, cleanup, event) returns the version already made instead of claiming the next.
    """
    from flows.commit import commit_and_announce, run_commit_token

    store = open_config_store(config)
    return commit_and_announce(store, config.storage, config.dataset, build_key=build_key, shard_keys=shard_keys,
                               manifest_fields=manifest_fields, card=render_card,
                               commit_token=commit_token if commit_token is not None else run_commit_token(),
                               staging_holder=staging_holder)


def code_version() -> str:
    version = metadata.version("stepforge")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                             capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


_PROGRESS_EVERY_S = 2.0  # how often a running build refreshes its Prefect progress artifact


class _ProblemCounter:
    """Counts `progress` events of this build's shard threads for the progress artifact."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, event: str, n: int) -> None:
        if event == "advance":
            with self._lock:
                self.done += n

    def percent(self, finished: bool) -> float:
        # Capped below 100 until the last shard is in: another build in the same process may also count.
        return 100.0 if finished else min(99.0, 100.0 * self.done / self.total)


def _artifact_key(dataset: str, what: str) -> str:
    from flows.commit import artifact_key

    return artifact_key(dataset, what)


@dataclass(frozen=True)
class _Shard:
    key: str  # content hash of the shard's problem rows
    problems: list[Problem]


def plan_shards(config: BuildConfig, source: SourceResult) -> list[_Shard]:
    problems = source.problems
    chunks = [problems[i : i + config.shard_size] for i in range(0, len(problems), config.shard_size)]
    # Keyed on whole rows, not ids: a problem_id is h(source, question), so a corrected gold answer or
    # metadata must make a new shard, or a resumed build would reuse the stale staged input and labels.
    return [_Shard(content_id("shard", [p.to_row() for p in chunk])[:20], chunk) for chunk in chunks]


def stage_inputs(store: ObjectStore, config: BuildConfig, build_key: str, shards: list[_Shard]) -> list[bool]:
    """Write each shard's input once; return which shards are already staged (finished before a crash)."""
    for shard in shards:
        input_key = stage_key(config.dataset, build_key, shard.key, "input")
        if not store.exists(input_key):
            write_parquet(store, input_key, to_table("problems", [p.to_row() for p in shard.problems]))
    return [staged_shard(store, config.dataset, build_key, shard.key) is not None for shard in shards]


def for_workers(config: BuildConfig) -> BuildConfig:
    """The config as shard tasks in other processes get it: a local store root made absolute, since a worker
    process's working folder need not be the flow's."""
    if config.storage.is_remote:
        return config
    root = str(Path(config.storage.root).expanduser().resolve())
    return config.model_copy(update={"storage": config.storage.model_copy(update={"root": root})})


def run_shards(config: BuildConfig, build_key: str, shards: list[_Shard], staged: list[bool]) -> list[BuildStats]:
    """One task per shard, `concurrency.shards` at a time (the task runner bounds them: each shard already
    batches its own policy calls), refreshing the progress artifact every few seconds while they run."""
    logger = get_run_logger()
    total = sum(len(s.problems) for s in shards)
    progress.set_total(total)
    from flows.commit import ProgressArtifact

    progress_artifact = ProgressArtifact(_artifact_key(config.dataset, "build-progress"),
                                         f"Problems of {config.dataset} done")
    # Problems finished in this process's shard threads (the ones the CLI's bar counts), so the Prefect UI
    # moves while a long shard runs rather than once per shard.
    counted = _ProblemCounter(total)
    unsubscribe = progress.subscribe(counted)
    for shard, was_staged in zip(shards, staged):
        if was_staged:
            progress.advance(len(shard.problems))

    def report(finished_all: bool) -> None:
        progress_artifact.update(counted.percent(finished_all))

    if config.concurrency.runner == "deployments":  # shards as runs of a deployment, on a pool's workers
        from flows.fanout import run_shards_as_deployments

        def staged_one(i: int, stats: BuildStats) -> None:
            log_shard_done(logger, i, len(shards), stats, resumed=staged[i])
            if not staged[i]:  # its problems were counted in another process
                progress.advance(len(shards[i].problems))

        try:
            return run_shards_as_deployments(config, build_key, shards, staged, on_done=staged_one, tick=report)
        finally:
            unsubscribe()

    # Prefect's cache is trusted only while the staged output it points at still exists (gc or a finished
    # commit removes staging); otherwise the shard is recomputed, its rollouts coming from the rollout cache.
    fresh = run_shard_task.with_options(refresh_cache=True)
    in_process = runs_in_this_process(config.concurrency)
    task_config = config if in_process else for_workers(config)
    try:
        with api_for_workers(config.concurrency), make_task_runner(config.concurrency) as runner:
            futures = [runner.submit(run_shard_task if was_staged else fresh,
                                     {"config": task_config, "build_key": build_key, "shard_key": shard.key, "index": i})
                       for i, (shard, was_staged) in enumerate(zip(shards, staged))]
            # Shards in other processes report no problems as they go: count each whole when it is done.
            unreported = {f: len(s.problems) for f, s, w in zip(futures, shards, staged) if not (in_process or w)}
            pending = set(futures)
            index = {id(f): i for i, f in enumerate(futures)}
            while pending:
                done, pending = wait(pending, timeout=_PROGRESS_EVERY_S)
                for future in sorted(done, key=lambda f: index[id(f)]):
                    i = index[id(future)]
                    # a failed shard fails the build now, with its own error
                    log_shard_done(logger, i, len(shards), future.result(), resumed=staged[i])
                    if future in unreported:
                        progress.advance(unreported.pop(future))
                report(not pending)
            return [f.result() for f in futures]
    finally:
        unsubscribe()


def log_shard_done(logger: Any, index: int, count: int, stats: BuildStats, *, resumed: bool) -> None:
    """One log line per finished shard, whichever runner ran it: what it made and how long it took."""
    how = "resumed from staging" if resumed else f"in {stats.seconds:.1f} s"
    logger.info("shard %d/%d done %s: %d problems, %d steps, %d rollouts (%d cache hits)",
                index + 1, count, how, stats.problems, stats.steps, stats.rollouts, stats.cache_hits)


def build_run_name(config: BuildConfig | dict[str, Any] | None = None) -> str:
    """The flow run's name in the UI: dataset and what is asked, e.g. `build demo (math-shepherd, 128
    problems)`. Without an argument, read from the running flow's parameters (Prefect calls it so)."""
    if config is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        config = (ctx.parameters if ctx is not None else {}).get("config")
    try:
        cfg = config if isinstance(config, BuildConfig) else BuildConfig.model_validate(config or {})
    except Exception:  # an invalid config fails the run with its own error; the name must not mask it
        return "build (invalid config)"
    source = cfg.source
    count = getattr(source, "num_problems", None) or getattr(source, "limit", None)
    what = source.kind if source.kind != "synthetic" or count is None else ""
    if count is not None:
        what = f"{what}, {count} problems" if what else f"{count} problems"
    return f"build {cfg.dataset} ({cfg.search.algorithm}, {what})"


@flow(name="build_dataset", log_prints=True, flow_run_name=build_run_name)
def build_dataset(config: BuildConfig = BuildConfig()) -> dict[str, Any]:
    """Build and commit one version of a step-labelled dataset: plan shards, stage their inputs, run them,
    commit, report."""
    store = open_config_store(config)
    # Before any work: a name that shares SQL views with another dataset (or is the catalog file) would
    # break the catalog of the whole root. The CLI checks this too, before the Prefect server starts.
    check_dataset_name(store, config.dataset, catalog=config.storage.catalog)
    check_runner(config.concurrency)  # a runner whose extra is missing on this machine: before any work
    # Builds of the same config running at once share one staging folder; the lease keeps it until the
    # last of them has committed.
    with hold_staging(store, config.dataset, config.build_key()) as lease:
        return _build(config, store, lease.holder)


def _build(config: BuildConfig, store: ObjectStore, staging_holder: str) -> dict[str, Any]:
    t0 = time.time()
    source = _load(config)
    source, dropped = _filter_problems(config, source)
    t_source = time.time()
    build_key = config.build_key()
    shards = plan_shards(config, source)
    staged = stage_inputs(store, config, build_key, shards)
    t_run = time.time()
    parts = run_shards(config, build_key, shards, staged)
    stats = BuildStats.total(parts)
    t_shards = time.time()
    # Rates over the shards this run computed: resumed ones cost it nothing and would inflate them.
    rates = BuildStats.total([p for p, was in zip(parts, staged) if not was]).rates(t_shards - t_run)
    manifest = commit_task(config, build_key, [s.key for s in shards], {
        "build_key": build_key,
        "config": recorded_config(config.model_dump(mode="json")),
        "seed": config.seed,
        "code_version": code_version(),
        "policy": policy_id(config),
        "algorithm": config.search.algorithm,
        "timings": {"source_s": round(t_source - t0, 3), "shards_s": round(t_shards - t_source, 3)},
        "stats": stats.to_dict(),
        "rates": rates,
        "source": {"kind": config.source.kind, "problems": len(source.problems),
                   "quarantined": len(source.quarantined), "duplicates": source.duplicates,
                   "quarantine": [q.to_row() for q in source.quarantined[:1000]]},
        "shards": {"count": len(shards), "size": config.shard_size, "resumed": sum(staged)},
        "problem_filters": filters.manifest_entry(dropped),
        **_pseudo_gold_entry(store, config, build_key, shards, stats),
        "consensus": consensus_from_counts(stats.consensus),
    }, staging_holder=staging_holder)
    summary = {
        "dataset": config.dataset, "version": manifest["version"], "content_hash": manifest["content_hash"],
        "location": store.uri(f"{config.dataset}/v{manifest['version']}"),
        "quarantined": len(source.quarantined), "shards": len(shards), "shards_resumed": sum(staged),
        "problems_dropped": filters.manifest_entry(dropped)["by_reason"],
        "seconds": round(time.time() - t0, 2), **stats.to_dict(), "label_by_step": stats.label_by_step(),
        "rates": rates, "consensus_summary": consensus_from_counts(stats.consensus),
    }
    _report(config, summary, stats)
    return summary


def _load(config: BuildConfig) -> SourceResult:
    source = load_source(config)
    if not source.problems:
        reasons = "; ".join(q.reason for q in source.quarantined[:3])
        raise SourceError(f"Source {config.source.kind!r} yielded no usable problems "
                          f"({len(source.quarantined)} quarantined: {reasons}).", field="source")
    if source.quarantined:
        get_run_logger().warning("%d malformed records quarantined, e.g. %s", len(source.quarantined),
                                 source.quarantined[0].reason)
    return source


_MAX_VOTES_LISTED = 1000  # voted references listed one by one in the manifest (all are counted)


def _pseudo_gold_entry(store: ObjectStore, config: BuildConfig, build_key: str, shards: list[_Shard],
                       stats: BuildStats) -> dict[str, Any]:
    """The manifest's `pseudo_gold` section when any problem had its reference voted: counts, the mean winning
    share, and per problem (read back from the staged `problems` tables) the answer and its vote share."""
    counts = stats.pseudo_gold
    n = int(counts.get("voted", 0) + counts.get("unresolved", 0))
    if not n:
        return {}
    records: list[dict[str, Any]] = []
    for shard in shards:
        if len(records) >= _MAX_VOTES_LISTED:
            break
        raw = store.read_bytes(stage_key(config.dataset, build_key, shard.key, "problems"))
        table = pq.read_table(io.BytesIO(raw), columns=["problem_id", "metadata"]).to_pylist()
        for row in table:
            vote = json.loads(row["metadata"] or "{}").get("pseudo_gold")
            if vote is not None:
                records.append({"problem_id": row["problem_id"], **vote})
    return {"pseudo_gold": {
        "voted": int(counts.get("voted", 0)), "unresolved": int(counts.get("unresolved", 0)),
        "mean_share": round(counts.get("share_sum", 0.0) / n, 4),
        "samples": config.pseudo_gold.samples, "min_share": config.pseudo_gold.min_share,
        "records": records[:_MAX_VOTES_LISTED]}}


def _filter_problems(config: BuildConfig, source: SourceResult) -> tuple[SourceResult, list[dict[str, Any]]]:
    """Decontamination and dedup before search (`decontaminate`, `dedup`): the source's problems less the
    dropped ones, and every dropped one with its reason and match (for the manifest). Before planning, so a
    dropped problem costs no search and shards are cut from what is searched."""
    kept, dropped = filters.filter_problems(source.problems, config.dedup, config.decontaminate)
    if not dropped:
        return source, dropped
    entry = filters.manifest_entry(dropped)
    get_run_logger().info("%d of %d problems dropped before search (%s); listed in the manifest's "
                          "`problem_filters`", len(dropped), len(source.problems),
                          ", ".join(f"{n} {r}" for r, n in entry["by_reason"].items()))
    if not kept:
        raise SourceError(f"All {len(source.problems)} problems of source {config.source.kind!r} were dropped before "
                          f"search ({entry['by_reason']}); check `decontaminate.benchmarks` and the thresholds "
                          "`decontaminate.threshold` / `dedup.threshold`.", field="decontaminate")
    return dataclasses.replace(source, problems=kept), dropped


def _report(config: BuildConfig, summary: dict[str, Any], stats: BuildStats) -> None:
    """The build's final log line and its Prefect artifacts: summary, label balance, labels by step position
    (table and image)."""
    get_run_logger().info("%s", summary_line(summary))
    create_markdown_artifact(render_summary_markdown(summary), key=_artifact_key(config.dataset, "build-summary"),
                             description=f"{config.dataset} v{summary['version']}")
    create_table_artifact(
        [{"label": "positive (c > 0)", "steps": stats.steps_positive},
         {"label": "negative (c = 0, k > 0)", "steps": stats.steps_negative},
         {"label": "no rollouts (k = 0)", "steps": stats.steps_unestimated}],
        key=_artifact_key(config.dataset, "label-balance"), description="Step labels at the default threshold")
    _consensus_artifact(config, summary)
    if summary["label_by_step"]:
        create_table_artifact(summary["label_by_step"], key=_artifact_key(config.dataset, "label-by-step"),
                              description="Share of positive steps and mean MC value by step position")
        create_markdown_artifact(
            label_distribution_markdown(stats, f"{config.dataset} v{summary['version']}: labels by step position"),
            key=_artifact_key(config.dataset, "label-distribution"),
            description="Label distribution by step position (image)")


def consensus_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The consensus table artifact's rows: pairwise agreement on the first error, then the share each rule
    keeps (`storage/consensus.py`; the rules are applied at export, this shows what each would keep)."""
    rows = [{"measure": f"agreement {p['a']} ~ {p['b']}", "solutions": p["both_decided"], "count": p["agree"],
             "share": "n/a" if p["rate"] is None else f"{p['rate']:.1%}",
             "meaning": "both decided / naming the same first wrong step"} for p in report.get("agreement", [])]
    rows += [{"measure": f"kept by {rule}", "solutions": report["solutions"],
              "count": round(share * report["solutions"]), "share": f"{share:.1%}",
              "meaning": f"solutions `--option consensus={rule}` keeps at export"}
             for rule, share in report.get("kept_share", {}).items()]
    return rows


def _consensus_artifact(config: BuildConfig, summary: dict[str, Any]) -> None:
    report = summary.get("consensus_summary") or {}
    if report:
        create_table_artifact(consensus_table(report), key=_artifact_key(config.dataset, "consensus"),
                              description="Agreement of MC, judge and step check on the first error, and the share "
                              "of solutions each consensus rule keeps")
