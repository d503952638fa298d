"""Human-facing text of a build: the summary (CLI and Prefect artifact) and the release's dataset card."""

from __future__ import annotations

from typing import Any

from tasks.stats import BuildStats


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's rows; `summary` is a build's result: where it went plus its `BuildStats` counters."""
    stats = BuildStats.from_dict(summary)
    balance = stats.label_balance
    return [
        ("dataset", f"{summary['dataset']} v{summary['version']}"),
        ("problems", f"{stats.problems} ({summary['quarantined']} quarantined)"),
        ("steps", str(stats.steps)),
        ("label balance", "n/a" if balance is None else
         f"{balance:.1%} positive (c > 0) / {1 - balance:.1%} negative"
         + (f" ({stats.steps_unestimated} of them without rollouts, k = 0)" if stats.steps_unestimated else "")),
        ("searched", _searched(stats)),
        ("nodes / pairs", f"{stats.nodes} / {stats.pairs}" + _by_kind(stats.pairs_by_kind)),
        ("rollouts spent", f"{stats.rollouts} in {stats.policy_requests} requests ({stats.cache_hits} cache hits)"),
        *_usage_rows(stats.usage),
        *_verdict_rows(stats.step_verdicts),
        *_dropped_rows(summary.get("problems_dropped") or {}),
        *_rate_rows(summary.get("rates") or {}),
        *_pseudo_gold_rows(stats.pseudo_gold),
        *_consensus_rows(summary.get("consensus_summary") or {}),
        ("shards", f"{summary['shards']} ({summary['shards_resumed']} resumed)"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("content hash", summary["content_hash"][:16]),
        ("location", summary["location"]),
    ]


def _usage_rows(usage: dict[str, Any]) -> list[tuple[str, str]]:
    if not usage:
        return []
    return [("policy tokens", f"{usage.get('prompt_tokens', 0)} prompt ({usage.get('cached_tokens', 0)} cached) + "
                              f"{usage.get('completion_tokens', 0)} completion"),
            ("policy requests", f"{usage.get('requests', 0)} ({usage.get('samples', 0)} samples, "
                                f"{usage.get('retries', 0)} retries, {usage.get('failures', 0)} failed)")]


def _rate_rows(rates: dict[str, Any]) -> list[tuple[str, str]]:
    """Throughput and the verifier's and the cache's rates, over the shards this run computed."""
    if not rates:
        return []

    def num(key: str, fmt: str) -> str:
        value = rates.get(key)
        return "n/a" if value is None else format(value, fmt)

    return [("rates", f"{num('rollouts_per_s', ',.0f')} rollouts/s, {num('completion_tokens_per_s', ',.0f')} "
                      f"completion tokens/s, cache hit rate {num('cache_hit_rate', '.1%')}"),
            ("verifier", f"{num('verifier_latency_ms', '.2f')} ms per batch call ({num('verdicts_per_verifier_call', '.1f')} "
                         f"verdicts each), {num('fast_path_share', '.1%')} decided on the fast path, "
                         f"timeout rate {num('verifier_timeout_rate', '.2%')}")]


def summary_line(summary: dict[str, Any]) -> str:
    """The build's last log line: what was committed, its content hash, its counts and rates."""
    stats = BuildStats.from_dict(summary)
    rates = summary.get("rates") or {}
    text = (f"committed {summary['dataset']} v{summary['version']} (content hash {summary['content_hash'][:16]}): "
            f"{stats.problems} problems, {stats.steps} steps, {stats.pairs} pairs, {stats.rollouts} rollouts "
            f"({stats.cache_hits} cache hits), {summary['shards']} shards ({summary['shards_resumed']} resumed), "
            f"{summary['seconds']:.1f} s")
    if rates.get("rollouts_per_s") is not None:
        text += f"; {rates['rollouts_per_s']:,.0f} rollouts/s"
    return text + f"; {summary['location']}"


def _searched(stats: BuildStats) -> str:
    skipped = {k: v for k, v in stats.skipped.items() if v}
    text = f"{stats.searched} of {stats.problems} problems"
    if skipped:
        text += " (skipped: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(skipped.items())) + ")"
    return text


def _by_kind(by_kind: dict[str, int]) -> str:
    return " (" + ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) + ")" if by_kind else ""


def _verdict_rows(counts: dict[str, int]) -> list[tuple[str, str]]:
    """One row per step verifier: its step verdicts by status (the judge's also per solution)."""
    by_verifier: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        name, _, status = key.partition("/")
        by_verifier.setdefault(name, {})[status] = n
    rows = []
    # Per-solution counts (the judge's, Lean's: "<name>-solutions") after the per-step rows.
    for name in sorted(by_verifier, key=lambda v: (v.endswith("-solutions"), v)):
        statuses = by_verifier[name]
        text = ", ".join(f"{statuses[s]} {s}" for s in ("valid", "invalid", "none", "error", "timeout") if s in statuses)
        whole = name.removesuffix("-solutions")
        rows.append((f"{name} verdicts" if whole == name else f"{whole}, per solution", text))
    return rows


def _dropped_rows(by_reason: dict[str, int]) -> list[tuple[str, str]]:
    """Problems dropped before search (dedup, decontamination), by reason; listed one by one in the manifest."""
    if not by_reason:
        return []
    return [("dropped before search", f"{sum(by_reason.values())} (" + ", ".join(
        f"{n} {r}" for r, n in sorted(by_reason.items())) + "; listed in the manifest's problem_filters)")]


def _pseudo_gold_rows(votes: dict[str, float]) -> list[tuple[str, str]]:
    """Problems whose reference was voted (no gold answer in the source)."""
    n = votes.get("voted", 0) + votes.get("unresolved", 0)
    if not n:
        return []
    return [("pseudo-gold", f"{int(votes.get('voted', 0))} of {int(n)} references voted (mean share "
                            f"{votes.get('share_sum', 0.0) / n:.1%}); {int(votes.get('unresolved', 0))} without a "
                            "clear majority, not searched")]


def _consensus_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Where MC, the judge and the step check agree on the first wrong step, and what each rule would keep."""
    if not report:
        return []
    agree = ", ".join(f"{p['a']}~{p['b']} " + ("n/a" if p["rate"] is None else f"{p['rate']:.0%} of {p['both_decided']}")
                      for p in report["agreement"])
    kept = ", ".join(f"{rule} {share:.0%}" for rule, share in report["kept_share"].items())
    return [("first-error agreement", agree), ("consensus keeps", f"{kept} of {report['solutions']} solutions")]


def render_summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    text = f"# Build of `{summary['dataset']}`\n\n" + "\n".join(lines) + "\n"
    by_step = summary.get("label_by_step") or []
    if by_step:
        text += ("\n## Labels by step position\n\nShares over steps with rollouts (k > 0).\n\n"
                 "| step | steps | k = 0 | positive (c > 0) | mean MC |\n|---|---|---|---|---|\n"
                 + "".join(f"| {r['step']} | {r['steps']} | {r['k = 0']} | {r['positive']} | {r['mean MC']} |\n"
                           for r in by_step))
    return text


def _card_source_notes(manifest: dict[str, Any]) -> str:
    """Card lines on what happened to the source's problems before search: voted references (pseudo-gold) and
    problems dropped as duplicates or benchmark copies. Empty when neither happened (the card, and with it
    the content hash, of other builds is unchanged)."""
    lines = []
    votes = manifest.get("pseudo_gold") or {}
    if votes:
        lines.append(f"- references: {votes['voted']} problems had no gold answer and carry the majority answer of "
                     f"{votes['samples']} sampled solutions (pseudo-gold, mean vote share {votes['mean_share']:.0%}; "
                     f"`metadata.pseudo_gold`); {votes['unresolved']} without a clear majority were not searched")
    dropped = manifest.get("problem_filters") or {}
    if dropped.get("dropped"):
        reasons = ", ".join(f"{n} {r}" for r, n in dropped["by_reason"].items())
        lines.append(f"- {dropped['dropped']} source problems left out before search ({reasons}); listed with their "
                     "match in `manifest.json` (`problem_filters`)")
    return "".join(line + "\n" for line in lines)


def _card_checker_notes(manifest: dict[str, Any]) -> str:
    """A card line for each Lean section the stand-in REPL served (set explicitly: a build never defaults to
    it), as `stepforge mustard`'s card does, so no release the stand-in checked reads as checked by Lean."""
    cfg = manifest.get("config") or {}
    sections = []
    if (cfg.get("formal") or {}).get("enabled"):
        sections.append(("formal.lean", (cfg.get("formal") or {}).get("lean") or {}))
    if (cfg.get("verifier") or {}).get("kind") == "lean":
        sections.append(("verifier.lean", (cfg.get("verifier") or {}).get("lean") or {}))
    return "".join(f"- `{where}`: checked by the stand-in, not Lean (a checker of a stated fragment of Lean 4 "
                   "that speaks the REPL's protocol)\n" for where, lean in sections
                   if "verifiers.lean.testing.repl_server" in (lean.get("command") or []))


def render_card(manifest: dict[str, Any]) -> str:
    """The release's README.md: what it is, how it was made, how to load it."""
    counts = manifest.get("row_counts", {})
    cfg = manifest.get("config", {})
    rows = "\n".join(f"| {t} | {n} |" for t, n in counts.items())
    return f"""# {manifest['dataset']} v{manifest['version']}

Step-level dataset built by stepforge ({manifest.get('code_version', '?')}).

| table | rows |
|---|---|
{rows}

- algorithm: `{manifest.get('algorithm')}`, policy: `{manifest.get('policy')}`, seed: `{manifest.get('seed')}`
- source: `{cfg.get('source', {}).get('kind')}`; parent version: `{manifest.get('parent_version')}`
- content hash: `{manifest.get('content_hash')}`
{_card_source_notes(manifest)}{_card_checker_notes(manifest)}
Labels are stored as raw Monte Carlo evidence (`mc_k`, `mc_c`); hard or soft labels are chosen at export.

```python
from datasets import load_dataset
steps = load_dataset("parquet", data_files="steps/*.parquet")
```
"""
