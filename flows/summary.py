"""Human-facing text of a build: the summary (CLI and Prefect artifact) and the release's dataset card."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def label_balance(summary: dict[str, Any]) -> float | None:
    steps = summary.get("steps", 0)
    return summary.get("steps_positive", 0) / steps if steps else None


def label_profile(steps: pa.Table) -> dict[str, dict[str, float]]:
    """Per-step-index counts of one shard's steps, as flat sums so shards add up key by key: steps,
    positive (c > 0), and the sum and count of MC values (steps without rollouts have none)."""
    out: dict[str, dict[str, float]] = {"by_index_steps": {}, "by_index_positive": {},
                                        "by_index_mc_sum": {}, "by_index_mc_n": {}}
    cols = steps.select(["step_index", "mc_c", "mc_value"]).to_pydict()
    for i, c, mc in zip(cols["step_index"], cols["mc_c"], cols["mc_value"]):
        key = str(i)
        out["by_index_steps"][key] = out["by_index_steps"].get(key, 0) + 1
        out["by_index_positive"][key] = out["by_index_positive"].get(key, 0) + (c > 0)
        if mc is not None:
            out["by_index_mc_sum"][key] = out["by_index_mc_sum"].get(key, 0.0) + mc
            out["by_index_mc_n"][key] = out["by_index_mc_n"].get(key, 0) + 1
    return out


def label_by_step(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The label distribution by step position, from summed `label_profile`s: where solutions go wrong."""
    steps = stats.get("by_index_steps") or {}
    rows = []
    for key in sorted(steps, key=int):
        n, pos = steps[key], (stats.get("by_index_positive") or {}).get(key, 0)
        mc_n = (stats.get("by_index_mc_n") or {}).get(key, 0)
        mc_sum = (stats.get("by_index_mc_sum") or {}).get(key, 0.0)
        # Shares are over steps with rollouts: OmegaPRM leaves steps between its probes at k = 0, and
        # counting those as negative would misstate where solutions go wrong.
        rows.append({"step": int(key) + 1, "steps": int(n), "k = 0": int(n - mc_n),
                     "positive": f"{pos / mc_n:.1%}" if mc_n else "n/a",
                     "mean MC": round(mc_sum / mc_n, 3) if mc_n else None})
    return rows


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    balance = label_balance(summary)
    return [
        ("dataset", f"{summary['dataset']} v{summary['version']}"),
        ("problems", f"{summary['problems']} ({summary['quarantined']} quarantined)"),
        ("steps", str(summary["steps"])),
        ("label balance", "n/a" if balance is None else
         f"{balance:.1%} positive (c > 0) / {1 - balance:.1%} negative"
         + (f" ({summary['steps_unestimated']} of them without rollouts, k = 0)"
            if summary.get("steps_unestimated") else "")),
        ("searched", _searched(summary)),
        ("nodes / pairs", f"{summary['nodes']} / {summary['pairs']}" + _by_kind(summary.get("pairs_by_kind"))),
        ("rollouts spent", f"{summary['rollouts']} in {summary['policy_requests']} requests "
                           f"({summary['cache_hits']} cache hits)"),
        *_usage_rows(summary.get("usage") or {}),
        *_verdict_rows(summary.get("step_verdicts") or {}),
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


def _searched(summary: dict[str, Any]) -> str:
    skipped = {k: v for k, v in (summary.get("skipped") or {}).items() if v}
    text = f"{summary.get('searched', summary['problems'])} of {summary['problems']} problems"
    if skipped:
        text += " (skipped: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(skipped.items())) + ")"
    return text


def _by_kind(by_kind: dict[str, int] | None) -> str:
    return " (" + ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) + ")" if by_kind else ""


def _verdict_rows(counts: dict[str, int]) -> list[tuple[str, str]]:
    """One row per step verifier: its step verdicts by status (the judge's also per solution)."""
    by_verifier: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        name, _, status = key.partition("/")
        by_verifier.setdefault(name, {})[status] = n
    rows = []
    for name in sorted(by_verifier, key=lambda v: (v == "judge-solutions", v)):
        statuses = by_verifier[name]
        text = ", ".join(f"{statuses[s]} {s}" for s in ("valid", "invalid", "none", "error", "timeout") if s in statuses)
        rows.append((f"{name} verdicts" if name != "judge-solutions" else "judge, per solution", text))
    return rows


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

Labels are stored as raw Monte Carlo evidence (`mc_k`, `mc_c`); hard or soft labels are chosen at export.

```python
from datasets import load_dataset
steps = load_dataset("parquet", data_files="steps/*.parquet")
```
"""
