"""The `mustard_dataset` Prefect flow: MUSTARD-style generation of Lean-verified problems and proofs.

Concept seeds are split into shards, one Prefect task each; a shard runs the generate-check-revise loop
(`tasks/mustard/pipeline.py`) for its seeds and journals its tables and counts under staging, so a rerun
after a crash skips every finished shard. The commit is one task at the end, through the same release
protocol as `build_dataset` (claimed version, manifest last, catalog, `stepforge.version.committed`):

- `mustard`: one row per seed whose proof Lean accepted (concept, problem, informal proof, formal proof,
  every attempt's verdict and Lean file, the feedback shown, the revisions it took);
- `problems`: their problems (`source = mustard`, `domain = lean`, `header`, `formal_statement`);
- `nodes`, `steps`, `pairs`: empty (a release has every table of the contract);
- the manifest's `stats`: seeds, passes, failures by reason (`invalid` after R revisions, `timeout`,
  `error`, `malformed`), passes by revisions, Lean verdicts, per level, and the failure records.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows import progress
from flows.commit import ProgressArtifact, artifact_key as _artifact_key, commit_and_announce, run_commit_token
from flows.mustard_config import (STANDIN_CHECKER, MustardConfig, author_id, checker_name, make_author,
                                  make_checker, seeds as plan_seeds, settings, standin_args)
from flows.stores import open_root
from storage.lease import hold_staging
from storage.names import check_dataset_name
from storage.objectstore import ObjectStore
from storage.release import stage_key, stage_shard, staged_shard
from storage.schema import content_id, to_table
from storage.secrets import recorded_config
from tasks.mustard.concepts import Seed
from tasks.mustard.pipeline import FAILURES_KEPT, SeedResult, merge_stats, rows, run_mustard, stats

ALGORITHM = "mustard"


@dataclass(frozen=True)
class _Shard:
    key: str
    seeds: list[Seed]


def plan(config: MustardConfig) -> list[_Shard]:
    """Shards of at most `shard_size` seeds, concepts kept whole where they fit: repeated problems come from
    one concept, and a shard's `problems` table holds each problem once, so a concept in one shard never
    gives the release two rows of one problem_id."""
    chunks: list[list[Seed]] = []
    for seed in plan_seeds(config):
        last = chunks[-1] if chunks else None
        starts_concept = last is not None and last[-1].concept.id != seed.concept.id
        fits = last is not None and len(last) + (config.samples_per_concept if starts_concept else 1) <= config.shard_size
        if last is None or len(last) >= config.shard_size or (starts_concept and not fits):
            chunks.append([seed])
        else:
            last.append(seed)
    return [_Shard(content_id("mustard-shard", [(s.seed_id, s.concept.model_dump()) for s in chunk])[:20], chunk)
            for chunk in chunks]


def _stats_key(config: MustardConfig, build_key: str, shard_key: str) -> str:
    return stage_key(config.dataset, build_key, shard_key, "stats").removesuffix(".parquet") + ".json"


async def _run(config: MustardConfig, seeds: list[Seed]) -> tuple[list[SeedResult], dict[str, int]]:
    from flows.build import _lean_slot

    author = make_author(config)
    checker = make_checker(config)
    try:
        results = await run_mustard(seeds, author, checker, settings(config), on_done=progress.advance,
                                    slot=_lean_slot(config.concurrency.lean_slots))
        return results, author.usage.as_dict()
    finally:
        await author.aclose()
        await checker.aclose()


@task(name="mustard-shard", task_run_name="mustard-shard-{index}")
def mustard_shard_task(config: MustardConfig, build_key: str, shard_key: str, index: int) -> dict[str, Any]:
    """Runs one shard's seeds, or reads its journal when a run before a crash finished it."""
    store = open_root(config.storage)
    stats_key = _stats_key(config, build_key, shard_key)
    if staged_shard(store, config.dataset, build_key, shard_key) is not None:
        return json.loads(store.read_bytes(stats_key))
    shard = plan(config)[index]
    if shard.key != shard_key:
        raise RuntimeError(f"shard {index} of the plan is {shard.key}, not {shard_key}: the concepts changed mid-run")
    results, usage = asyncio.run(_run(config, shard.seeds))
    problems, records = rows(results, author_id(config))
    shard_stats = {**stats(results), "usage": usage}
    store.write_bytes(stats_key, json.dumps(shard_stats, sort_keys=True).encode())
    # The marker written last by stage_shard is the journal entry: the counts above are in place before it.
    stage_shard(store, config.dataset, build_key, shard_key,
                {"problems": to_table("problems", problems), "mustard": to_table("mustard", records)})
    return shard_stats


def render_card(manifest: dict[str, Any]) -> str:
    """The release's README.md."""
    st = manifest.get("stats") or {}
    counts = "\n".join(f"| {t} | {n} |" for t, n in manifest.get("row_counts", {}).items())
    failed = ", ".join(f"{n} {k}" for k, n in (st.get("failed") or {}).items()) or "none"
    after = ", ".join(f"{n} after {k}" for k, n in (st.get("passed_after_revisions") or {}).items()) or "none"
    standin = manifest.get("verifier") == STANDIN_CHECKER
    # A release the stand-in checked must never read as Lean-verified.
    what = ("Problems and proofs checked by the stand-in, not Lean (a checker of a stated fragment of Lean 4 "
            "that speaks the REPL's protocol), generated" if standin else "Lean-verified problems and proofs generated")
    checker = (f"checker: `{manifest.get('verifier')}` (the stand-in, not Lean)" if standin
               else f"Lean: `{manifest.get('verifier')}`")
    return f"""# {manifest['dataset']} v{manifest['version']}

{what} MUSTARD-style by stepforge ({manifest.get('code_version', '?')}):
concept seeds, an author model writing a problem, an informal proof and a Lean 4 proof, {'the stand-in' if standin else 'Lean'} checking it,
up to {(manifest.get('config') or {}).get('max_revisions')} revisions with its messages.

| table | rows |
|---|---|
{counts}

- seeds: {st.get('seeds')}, passed: {st.get('passed')} ({after}), failed: {failed}
- author: `{manifest.get('policy')}`, {checker}, seed: `{manifest.get('seed')}`
- content hash: `{manifest.get('content_hash')}`

Each `mustard` row holds the concept, the problem, the informal proof, the formal proof the checker accepted,
every attempt's Lean file and verdict, and the checker's messages shown to the author. Failed seeds are all
counted in `manifest.json` (`stats.failed`); the first {FAILURES_KEPT:,} are listed (`stats.failures`).

```python
from datasets import load_dataset
records = load_dataset("parquet", data_files="mustard/*.parquet")
```
"""


@task(name="commit-mustard", retries=2, retry_delay_seconds=[1, 5])
def commit_mustard_task(config: MustardConfig, build_key: str, shard_keys: list[str], manifest_fields: dict[str, Any],
                        staging_holder: str | None = None) -> dict:
    """Commit the staged shards, sync the catalog, release staging, emit the event, as a build's commit does
    (`flows.commit`); safe to retry as a whole (the flow run id is the commit token, so a retry returns the
    version an earlier attempt made)."""
    store = open_root(config.storage)
    return commit_and_announce(store, config.storage, config.dataset, build_key=build_key, shard_keys=shard_keys,
                               manifest_fields=manifest_fields, card=render_card, commit_token=run_commit_token(),
                               staging_holder=staging_holder, event_payload={"algorithm": ALGORITHM})


@flow(name="mustard_dataset", log_prints=True)
def mustard_dataset(config: MustardConfig = MustardConfig()) -> dict[str, Any]:
    """Generate Lean-verified problems and proofs from concept seeds (MUSTARD-style) and commit a version."""
    store = open_root(config.storage)
    check_dataset_name(store, config.dataset, catalog=config.storage.catalog)
    with hold_staging(store, config.dataset, config.build_key()) as lease:
        return _mustard(config, store, lease.holder)


def _mustard(config: MustardConfig, store: ObjectStore, staging_holder: str) -> dict[str, Any]:
    from flows.build import code_version

    t0 = time.time()
    build_key = config.build_key()
    shards = plan(config)
    staged = [staged_shard(store, config.dataset, build_key, s.key) is not None for s in shards]
    progress.set_total(sum(len(s.seeds) for s in shards))
    for shard, was_staged in zip(shards, staged):
        if was_staged:
            progress.advance(len(shard.seeds))
    # The Prefect UI's progress: seeds of finished shards (the CLI's bar counts seeds as they finish).
    total = max(1, sum(len(s.seeds) for s in shards))
    progress_artifact = ProgressArtifact(_artifact_key(config.dataset, "mustard-progress"),
                                         f"Seeds of {config.dataset} done")
    with ThreadPoolTaskRunner(max_workers=config.concurrency.shards) as runner:
        futures = [runner.submit(mustard_shard_task, {"config": config, "build_key": build_key,
                                                      "shard_key": s.key, "index": i})
                   for i, s in enumerate(shards)]
        pending, done_seeds = set(futures), 0
        while pending:
            done, pending = wait(pending, timeout=2.0)
            for future in done:
                future.result()  # a failed shard fails the run now, with its own error
                done_seeds += len(shards[futures.index(future)].seeds)
            progress_artifact.update(100.0 * done_seeds / total)
        parts = [f.result() for f in futures]
    t_shards = time.time()
    merged = merge_stats(parts)
    usage: dict[str, int] = {}
    for p in parts:
        for k, v in (p.get("usage") or {}).items():
            usage[k] = usage.get(k, 0) + v
    merged["usage"] = usage
    manifest = commit_mustard_task(config, build_key, [s.key for s in shards], {
        "build_key": build_key,
        "config": manifest_config(config),
        "templates": {"author": settings(config).author_template, "revise": settings(config).revise_template},
        "seed": config.seed,
        "code_version": code_version(),
        "policy": author_id(config),
        "verifier": checker_name(config),
        "algorithm": ALGORITHM,
        "timings": {"shards_s": round(t_shards - t0, 3)},
        "stats": merged,
        "shards": {"count": len(shards), "size": config.shard_size, "resumed": sum(staged)},
    }, staging_holder=staging_holder)
    summary = {"dataset": config.dataset, "version": manifest["version"], "content_hash": manifest["content_hash"],
               "location": store.uri(f"{config.dataset}/v{manifest['version']}"), "shards": len(shards),
               "shards_resumed": sum(staged), "seconds": round(time.time() - t0, 2), **merged}
    create_markdown_artifact(render_summary_markdown(summary), key=_artifact_key(config.dataset, "mustard-summary"),
                             description=f"{config.dataset} v{manifest['version']}")
    return summary


def manifest_config(config: MustardConfig) -> dict[str, Any]:
    """The config as the manifest records it: values of `lean.env` (variables for the REPL, which may hold
    a key) are left out, their names kept; the stand-in's command is written `python -m ...`, not with this
    machine's path of Python."""
    recorded = recorded_config(config.model_dump(mode="json"))
    args = standin_args(config.lean)
    if args is not None:
        recorded["lean"]["command"] = ["python", "-m", "verifiers.lean.testing.repl_server", *args]
    return recorded


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    failed = summary.get("failed") or {}
    after = summary.get("passed_after_revisions") or {}
    usage = summary.get("usage") or {}
    rate = summary.get("pass_rate")
    return [
        ("dataset", f"{summary['dataset']} v{summary['version']}"),
        ("seeds", str(summary["seeds"])),
        ("passed", f"{summary['passed']}" + (f" ({rate:.1%})" if rate is not None else "")),
        ("passed after revisions", ", ".join(f"{k}: {n}" for k, n in after.items()) or "none"),
        ("failed", ", ".join(f"{n} {k}" for k, n in failed.items()) or "none"),
        ("lean checks", f"{summary['lean_checks']} (" + ", ".join(
            f"{n} {k}" for k, n in (summary.get("lean_verdicts") or {}).items()) + ")"),
        ("author requests", f"{summary['author_requests']} ({usage.get('prompt_tokens', 0)} prompt + "
                            f"{usage.get('completion_tokens', 0)} completion tokens)"),
        ("shards", f"{summary['shards']} ({summary['shards_resumed']} resumed)"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("content hash", summary["content_hash"][:16]),
        ("location", summary["location"]),
    ]


def render_summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    return f"# MUSTARD-style generation of `{summary['dataset']}`\n\n" + "\n".join(lines) + "\n"
