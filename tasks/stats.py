"""`BuildStats`: the counters of one shard or of a whole build. Shards add up with `+`; this class is the
one place the counters are named (the manifest's `stats`, the build summary, the CLI and the Prefect
artifacts all read them from here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _add_maps(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class BuildStats:
    problems: int = 0
    searched: int = 0  # problems searched (the rest were skipped by budgeting)
    skipped: dict[str, int] = field(default_factory=dict)  # skip reason -> problems
    nodes: int = 0
    steps: int = 0
    pairs: int = 0
    pairs_by_kind: dict[str, int] = field(default_factory=dict)
    steps_positive: int = 0  # c > 0
    steps_unestimated: int = 0  # k = 0 (OmegaPRM estimates only its binary search's probes)
    policy_requests: int = 0
    rollouts: int = 0  # samples the policy generated
    generated_steps: int = 0
    cache_hits: int = 0
    memo_hits: int = 0
    verifications: int = 0
    undecided_verdicts: int = 0
    timeout_verdicts: int = 0  # undecided because the verifier ran out of time
    usage: dict[str, int] = field(default_factory=dict)  # the policy backend's accounting (`PolicyUsage`)
    # Step verifiers: "<verifier>/<status>" -> steps, "judge-solutions/<status>" -> solutions judged.
    step_verdicts: dict[str, int] = field(default_factory=dict)
    # Majority-vote pseudo-gold (problems without a gold answer): "voted" (a reference was found),
    # "unresolved" (no clear majority: not searched) and "share_sum" (the winning shares, for the mean).
    pseudo_gold: dict[str, float] = field(default_factory=dict)
    # Consensus of first-error opinions (MC, judge, step check, Lean) over the shard's solutions, as flat
    # counts that add up (`storage.exports.labels.consensus_counts`); the summary turns them into rates.
    consensus: dict[str, int] = field(default_factory=dict)
    # Per step index (as a string: JSON keys), flat sums so shards add up key by key: steps, positive
    # (c > 0), and the sum and count of MC values (steps without rollouts have none).
    by_index_steps: dict[str, int] = field(default_factory=dict)
    by_index_positive: dict[str, int] = field(default_factory=dict)
    by_index_mc_sum: dict[str, float] = field(default_factory=dict)
    by_index_mc_n: dict[str, int] = field(default_factory=dict)
    # Measurements, not data: they go into the manifest's `stats` and `rates` (which the content hash, a
    # digest of the Parquet files alone, never sees) and differ from run to run.
    verify_batches: int = 0  # calls to the verifier's batch API (the scheduler hands it one batch per call)
    batched_verdicts: int = 0  # verdicts those calls returned
    verify_seconds: float = 0.0  # wall time of those calls, summed
    # The verifier's fast path (`verify_now`, in a tree's own step): calls, and the verdicts it gave at once.
    # Its items are few per call, so it is kept out of the batch counts above and reported as a share.
    verify_fast_calls: int = 0
    fast_verdicts: int = 0
    seconds: float = 0.0  # wall time of the shards' searches, summed over shards

    def __add__(self, other: "BuildStats") -> "BuildStats":
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = _add_maps(a, b) if isinstance(a, dict) else a + b
        return BuildStats(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BuildStats":
        """From `to_dict` output (a shard's journal, a manifest); keys that are not counters are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def total(cls, parts: Sequence["BuildStats"]) -> "BuildStats":
        return sum(parts, cls())

    @property
    def steps_negative(self) -> int:
        """Steps with rollouts none of which reached the answer (c = 0, k > 0)."""
        return self.steps - self.steps_positive - self.steps_unestimated

    @property
    def label_balance(self) -> float | None:
        return self.steps_positive / self.steps if self.steps else None

    def rates(self, wall_s: float) -> dict[str, float | None]:
        """Throughput over ``wall_s`` seconds of build time (the shard phase), and the verifier's and the
        rollout cache's rates. None where there is nothing to divide by (no time, no verifier call)."""
        lookups = self.cache_hits + self.policy_requests
        fresh = self.fast_verdicts + self.batched_verdicts
        return {
            "rollouts_per_s": round(self.rollouts / wall_s, 2) if wall_s > 0 else None,
            "completion_tokens_per_s": round(self.usage.get("completion_tokens", 0) / wall_s, 2) if wall_s > 0 else None,
            # Per call to the verifier's batch API: how long one took and how many verdicts it returned (the
            # scheduler's batching), fast-path calls left out; then the share of fresh verdicts (memo re-reads
            # left out) that the fast path gave without a batch.
            "verifier_latency_ms": round(1000 * self.verify_seconds / self.verify_batches, 3) if self.verify_batches else None,
            "verdicts_per_verifier_call": round(self.batched_verdicts / self.verify_batches, 2) if self.verify_batches else None,
            "fast_path_share": round(self.fast_verdicts / fresh, 6) if fresh else None,
            "verifier_timeout_rate": round(self.timeout_verdicts / self.verifications, 6) if self.verifications else None,
            # Share of policy requests served from the persistent rollout cache (not the in-shard memo).
            "cache_hit_rate": round(self.cache_hits / lookups, 6) if lookups else None,
        }

    def label_by_step(self) -> list[dict[str, Any]]:
        """The label distribution by step position: where solutions go wrong."""
        rows = []
        for key in sorted(self.by_index_steps, key=int):
            n, pos = self.by_index_steps[key], self.by_index_positive.get(key, 0)
            mc_n, mc_sum = self.by_index_mc_n.get(key, 0), self.by_index_mc_sum.get(key, 0.0)
            # Shares are over steps with rollouts: OmegaPRM leaves steps between its probes at k = 0, and
            # counting those as negative would misstate where solutions go wrong.
            rows.append({"step": int(key) + 1, "steps": int(n), "k = 0": int(n - mc_n),
                         "positive": f"{pos / mc_n:.1%}" if mc_n else "n/a",
                         "mean MC": round(mc_sum / mc_n, 3) if mc_n else None})
        return rows


def step_profile(steps: pa.Table) -> BuildStats:
    """The step counters of one shard's `steps` table.

    Column-wise (it runs after a shard's last answer, where every millisecond delays the shard's end): the same
    numbers as adding the rows up one by one in table order, keys in the order they first appear, and the MC sums
    bit for bit (`np.bincount` adds its weights in input order, as a running sum over the rows does)."""
    out = BuildStats(steps=steps.num_rows)
    if not steps.num_rows:
        return out
    index = steps.column("step_index").to_numpy()
    positive = steps.column("mc_c").to_numpy() > 0
    mc = steps.column("mc_value")
    has_mc = np.asarray(mc.is_valid()) if mc.null_count else np.ones(len(index), bool)
    mc_values = pc.fill_null(mc, 0.0).to_numpy()
    out.steps_positive = int(positive.sum())
    out.steps_unestimated = int((steps.column("mc_k").to_numpy() == 0).sum())
    keys, first, slot = np.unique(index, return_index=True, return_inverse=True)
    counts = np.bincount(slot, minlength=len(keys))
    positives = np.bincount(slot, weights=positive, minlength=len(keys))
    for i in np.argsort(first, kind="stable"):
        out.by_index_steps[str(keys[i])] = int(counts[i])
        out.by_index_positive[str(keys[i])] = int(positives[i])
    if has_mc.any():
        mc_slot = slot[has_mc]
        sums = np.bincount(mc_slot, weights=mc_values[has_mc], minlength=len(keys))
        ns = np.bincount(mc_slot, minlength=len(keys))
        _, mc_first = np.unique(mc_slot, return_index=True)
        for i in np.unique(mc_slot)[np.argsort(mc_first, kind="stable")]:
            out.by_index_mc_sum[str(keys[i])] = float(sums[i])
            out.by_index_mc_n[str(keys[i])] = int(ns[i])
    return out
