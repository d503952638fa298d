"""Hard step labels of the PRM exports (``trl-prm``, ``math-shepherd``, ``prm800k``) and the consensus filter
applied to them.

Two rules turn the stored Monte Carlo evidence into hard labels:

- ``first-error`` (the default at threshold 0): a step is good iff it comes before the solution's stored
  ``first_error_index``, the first step from which no rollout, of its own prefix or of any longer prefix
  below it in the tree, reached the answer. A rollout from a later step continues this step's prefix too,
  so a step whose own k rollouts all failed by chance is still good when a step after it reached the answer.
- ``per-step``: each step by its own estimate, ``mc_value > threshold`` (Math-Shepherd's hard estimate at
  threshold 0); the only rule for a threshold > 0.
- ``soft-drop``: the first step whose own c/k falls below ``SOFT_DROP`` (one half) of the c/k of the prefix
  before it is the first error (the question's own c/k, from the root's probe, for step 0: ``mc_value -
  advantage``). Built for policies that recover from mistakes: with recovery, some rollout from a wrong
  prefix often reaches the answer, so "any rollout correct" (both rules above) calls wrong steps good, and
  more rollouts make it worse (more chances to recover); the drop in c/k a wrong step causes survives.

Measured on the synthetic domain's oracle (32 problems, step error rate 0.3, N = 4 rollouts): first-error F1
0.94 with ``first-error`` against 0.58 with ``per-step`` (tests/test_export_labels.py checks the direction).
With recovery and lucky answers on (benchmarks/NOTES-issue12.md, part 3, high noise, N = 16) the order flips:
``first-error`` 0.17, ``soft-drop`` 0.72, and ``consensus=mc-and-judge`` over ``soft-drop`` labels 0.97
(over ``first-error`` labels 0.73, under the judge alone, 0.77).
"""

from __future__ import annotations

from typing import Literal, Sequence

import pyarrow as pa

from typing import Any

from storage.consensus import labels_opinion, verdict_opinions
from storage.errors import ConfigError
from storage.exports.base import ReleaseData, Unestimated, solution_hard_labels, solutions

StepLabels = Literal["first-error", "per-step", "soft-drop"]
STEP_LABELS_DESCRIPTION = (
    "How hard labels are read from the Monte Carlo evidence: `first-error` labels a step good iff it comes "
    "before the solution's stored `first_error_index` (any rollout from the step or from a longer prefix "
    "below it reached the answer; far fewer false negatives at small N); `per-step` labels each step by its "
    "own `mc_value > threshold`; `soft-drop` makes the first step whose c/k falls below half the c/k of the "
    "prefix before it the first error (for policies that recover from mistakes, where any-rollout-correct "
    "calls wrong steps good; needs every step estimated). Unset: `first-error` at threshold 0, `per-step` "
    "for a threshold > 0.")

# Columns of `solutions(steps, ...)` the label rules read.
LABEL_COLUMNS = ["mc_value", "mc_k", "mc_c", "first_error_index", "advantage"]
# `soft-drop`: a step is the first error when its c/k falls below this share of the c/k before it. One half is
# the benchmark's value from before the rule existed (benchmarks/label_quality.py, `mc-soft`), not tuned to it.
SOFT_DROP = 0.5


def resolve_step_labels(step_labels: StepLabels | None, threshold: float, fmt: str) -> StepLabels:
    """The rule an export uses; an explicit ``first-error`` with a threshold > 0 is refused (the first-error
    rule is "any rollout reached the answer", which has no threshold)."""
    if step_labels is None:
        return "first-error" if threshold == 0.0 else "per-step"
    if step_labels == "first-error" and threshold != 0.0:
        raise ConfigError(f"`{fmt}.step_labels=first-error` labels by 'any rollout reached the answer' and takes no "
                          f"threshold, got threshold={threshold}: drop the threshold or use step_labels=per-step.",
                          field=f"{fmt}.step_labels", value=step_labels)
    if step_labels == "soft-drop" and threshold != 0.0:
        raise ConfigError(f"`{fmt}.step_labels=soft-drop` labels by the drop in c/k a step causes and takes no "
                          f"threshold, got threshold={threshold}: drop the threshold or use step_labels=per-step.",
                          field=f"{fmt}.step_labels", value=step_labels)
    return step_labels


def soft_drop_first_error(values: Sequence[float | None], before_first: float | None,
                          fallback: int | None = None) -> int | None:
    """`soft-drop`'s first error of one solution: the first step i whose c/k ``values[i]`` is below SOFT_DROP
    times the c/k before it (``values[i - 1]``, or ``before_first``, the question's own c/k, for step 0; when
    that is unknown, step 0 is the first error only if none of its rollouts reached the answer). -1: no step
    drops and the last step still reaches the answer. A solution that ends at c/k 0 without a drop (its
    question's c/k was already 0) gets ``fallback`` (the stored `first_error_index`). None (the solution
    cannot be labelled) when a step has no estimate, or when such a solution has no fallback."""
    if not values or any(v is None for v in values):
        return None
    for i, v in enumerate(values):
        before = values[i - 1] if i else before_first
        if (v == 0.0 if before is None else v < SOFT_DROP * before):
            return i
    return -1 if values[-1] > 0.0 else fallback


def first_error_labels(mc_k: Sequence[int | None], first_error: int | None, unestimated: Unestimated) -> list[bool] | None:
    """One solution's labels by its first error; None when undecided: no first error and its last step has no
    rollouts (nothing says the end of the solution reaches the answer), or, with ``unestimated=drop``, any
    step without rollouts."""
    if unestimated == "drop" and not all(mc_k):
        return None
    n = len(mc_k)
    if first_error is not None:
        return [i < first_error for i in range(n)]
    # No step is proven bad; the last step's own evidence (for a finished solution, its outcome check) is not
    # False, and it lies below every other step, so every step reached the answer.
    return [True] * n if n and mc_k[-1] else None


def solution_labels(per_solution: pa.Table, rule: StepLabels, threshold: float,
                    unestimated: Unestimated) -> list[list[bool] | None]:
    """Per row of ``solutions(steps, [..., *LABEL_COLUMNS])``: its hard labels under ``rule``, or None."""
    if rule == "per-step":
        return solution_hard_labels(per_solution, threshold, unestimated)
    if rule == "soft-drop":
        cols = per_solution.select(["mc_value_list", "advantage_list", "first_error_index_list"]).to_pydict()
        out: list[list[bool] | None] = []
        for values, advs, fes in zip(cols["mc_value_list"], cols["advantage_list"], cols["first_error_index_list"]):
            # The question's own c/k is what the first step's advantage was measured against.
            root = values[0] - advs[0] if values and values[0] is not None and advs[0] is not None else None
            fe = soft_drop_first_error(values, root, fes[0] if fes else None)
            out.append(None if fe is None else [fe == -1 or i < fe for i in range(len(values))])
        return out
    cols = per_solution.select(["mc_k_list", "first_error_index_list"]).to_pydict()
    return [first_error_labels(ks, fes[0] if fes else None, unestimated)
            for ks, fes in zip(cols["mc_k_list"], cols["first_error_index_list"])]


def adaptive_warning(data: ReleaseData) -> str | None:
    """A warning when soft values (c/k) are read from a release built with adaptive Monte Carlo, whose sampling
    stopped at the first correct chunk: c/k there is not an estimate of the success rate."""
    search = (data.manifest.get("config") or {}).get("search") or {}
    if not search.get("adaptive"):
        return None
    return ("this release was built with `search.adaptive` (rollouts stop at the first correct chunk), so c/k is "
            "not a success rate: soft values and c/k-based ratings are biased; hard labels are unaffected.")


_OPINION_SOURCES = ("mc", "judge", "check", "lean")  # in the order the agreement table lists them


def consensus_counts(steps: pa.Table) -> dict[str, int]:
    """The counts behind ``consensus_summary``, flat, so that shards of a build add up key by key:
    ``solutions``; ``has:<source>`` (solutions where the source left an opinion, decided or not);
    ``both:<a>~<b>`` / ``agree:<a>~<b>`` (both decided / naming the same first error) for every pair of
    sources; ``kept:<rule>`` (solutions the rule keeps). Empty when the steps carry no step-verifier verdicts."""
    from storage.consensus import RULES, agreement, decide

    opinions = verdict_opinions(steps)
    if not any(opinions.values()):  # no column, or a build with no step verifier: empty verdict lists
        return {}
    per = solutions(steps, ["step_text", *LABEL_COLUMNS])
    mc = [labels_opinion(lab) for lab in solution_labels(per, "first-error", 0.0, "infer")]
    rows = [{**opinions.get(sid, {}), "mc": m} for sid, m in zip(per["solution_id"].to_pylist(), mc)]
    counts = {"solutions": len(rows)}
    counts.update({f"has:{name}": sum(name in r for r in rows) for name in _OPINION_SOURCES})
    for pair in agreement(rows, _OPINION_SOURCES):
        counts[f"both:{pair['a']}~{pair['b']}"] = pair["both_decided"]
        counts[f"agree:{pair['a']}~{pair['b']}"] = pair["agree"]
    counts.update({f"kept:{rule}": sum(decide(rule, r).keep for r in rows) for rule in RULES})
    return counts


def consensus_from_counts(counts: dict[str, int]) -> dict[str, Any]:
    """``consensus_summary``'s report from (summed) ``consensus_counts``: the pairwise agreement of the
    sources present and the share each rule keeps (a two-party rule only where its partner is present)."""
    from storage.consensus import PARTNERS, RULES

    n = counts.get("solutions", 0)
    if not n:
        return {}
    present = [name for name in _OPINION_SOURCES if counts.get(f"has:{name}")]
    pairs = []
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            both, same = counts.get(f"both:{a}~{b}", 0), counts.get(f"agree:{a}~{b}", 0)
            pairs.append({"a": a, "b": b, "both_decided": both, "agree": same,
                          "rate": round(same / both, 6) if both else None})
    kept = {rule: round(counts.get(f"kept:{rule}", 0) / n, 4) for rule in RULES
            if rule not in PARTNERS or PARTNERS[rule] in present}
    return {"solutions": n, "agreement": pairs, "kept_share": kept}


def consensus_summary(steps: pa.Table) -> dict[str, Any]:
    """For a build's summary: the pairwise agreement of MC (first-error labels), the judge and the step checks
    on each solution's first error, and the share of solutions each rule keeps. Empty when the steps carry no
    step-verifier verdicts."""
    return consensus_from_counts(consensus_counts(steps))
