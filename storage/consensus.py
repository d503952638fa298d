"""Consensus of first-error opinions: which solutions to keep when Monte Carlo estimation, an LLM judge and
step checks are asked where a solution's first wrong step is.

Every verifier's per-step verdicts are stored as raw evidence (``steps.verdicts``); rules are applied here,
where labels are made (exports, benchmarks, build summaries), never at write time. One pure module over
plain data, importable by ``storage.exports`` and by ``tasks``.

**Opinions.** A solution's first-error opinion is the 0-based index of its first wrong step, ``-1`` for "no
wrong step", or ``None`` for "undecided":

- a verifier's (``judge``, ``lean``, …): the smallest step index whose verdict is ``invalid``; ``-1`` if every
  step was decided (``valid`` or ``none``) and none is invalid; ``None`` if an ``error`` or ``timeout``, or a
  step without a verdict, comes before any ``invalid``, and ``None`` if every verdict is ``none`` (the
  verifier found nothing to check: it has no opinion, rather than a clean bill);
- the step check's (``check``): the same over the step checks ``arith-check`` and ``code-check`` merged per
  step (``invalid`` if either says so, else ``error``/``timeout`` if either does, else ``valid`` if either
  checked something, else ``none``);
- Monte Carlo's (``mc``): what the export's labels say (the first step labelled bad, ``-1`` if none), by
  default from ``steps.first_error_index``.

**Rules** (Qwen, "The Lessons of Developing Process Reward Models in Mathematical Reasoning", 2025, keeps only
the samples on which MC estimation and an LLM judge agree on the first wrong step):

- ``none``: keep every solution, labels from MC;
- ``mc-and-judge``: keep a solution only if MC's and the judge's opinions are both decided and equal;
- ``mc-and-check``: the same with the step check;
- ``mc-and-formal``: the same with Lean (``lean``: the build's ``formal`` section checks each solution whole and
  spreads the verdict over its steps, +1 before Lean's first error, -1 at it), the DeepSeek-Prover-style filter
  for the formal domain;
- ``majority``: over the decided opinions available (MC, judge, step check, Lean, any other step verifier), keep a
  solution when at least two are decided and more than half of them name the same first error; that
  first error becomes the solution's label even where MC is outvoted (counted as ``relabelled``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import StorageError

__all__ = ["RULES", "Rule", "CONSENSUS_DESCRIPTION", "Opinion", "Decision", "ConsensusReport", "MC", "JUDGE",
           "CHECK", "FORMAL", "PARTNERS", "STEP_CHECKS", "first_error_opinion", "labels_opinion", "verdict_opinions", "verifier_opinions", "majority_arrays", "NO_OPINION", "decide",
           "agreement"]

Rule = Literal["none", "mc-and-judge", "mc-and-check", "mc-and-formal", "majority"]
RULES: tuple[str, ...] = ("none", "mc-and-judge", "mc-and-check", "mc-and-formal", "majority")
CONSENSUS_DESCRIPTION = (
    "Which solutions to keep, by the first-error opinions of Monte Carlo (`mc`), the LLM judge and the step "
    "checks stored in `steps.verdicts`: `none` keeps all; `mc-and-judge` keeps a solution only if MC and the "
    "judge name the same first wrong step (Qwen's consensus filter); `mc-and-check` the same with the "
    "arithmetic/code step checks; `mc-and-formal` the same with Lean's first error (`formal` section); "
    "`majority` keeps it when most of the decided opinions (at least two) agree, labelled with their first error. What is kept and dropped (and why) is reported in `export.json`.")

MC, JUDGE, CHECK, FORMAL = "mc", "judge", "check", "lean"
STEP_CHECKS: tuple[str, ...] = ("arith-check", "code-check")
# Which opinion each two-party rule compares MC with.
_PARTNER = {"mc-and-judge": JUDGE, "mc-and-check": CHECK, "mc-and-formal": FORMAL}
PARTNERS = _PARTNER  # read-only use outside: which opinion each two-party rule compares MC with
# What to turn on when a release has no verdict of a rule's partner.
_PARTNER_HOW = {JUDGE: "judge", CHECK: "step-check (`arith-check`/`code-check`)",
                FORMAL: "Lean (`lean`, from the build's `formal` section)"}

# None: undecided; -1: no wrong step; i >= 0: the first wrong step.
Opinion = int | None

# An undecided opinion (None) in an int64 array of opinions (`verifier_opinions`, the streamed exports).
NO_OPINION = np.iinfo(np.int64).min

_DECIDED = frozenset({"valid", "invalid", "none"})


def first_error_opinion(statuses: Sequence[str | None]) -> Opinion:
    """One verifier's opinion from its per-step statuses in step order (``None``: no verdict for the step)."""
    for i, status in enumerate(statuses):
        if status == "invalid":
            return i
        if status not in _DECIDED:  # error, timeout, or missing: what follows cannot be trusted as "no error"
            return None
    if not statuses or all(s == "none" for s in statuses):
        return None
    return -1


def labels_opinion(labels: Sequence[bool] | None) -> Opinion:
    """MC's opinion from one solution's hard step labels: the first step labelled bad, -1 if none."""
    if labels is None:
        return None
    return next((i for i, good in enumerate(labels) if not good), -1)


def _merge_checks(statuses: Sequence[str]) -> str:
    if "invalid" in statuses:
        return "invalid"
    for undecided in ("error", "timeout"):
        if undecided in statuses:
            return undecided
    if "valid" in statuses:
        return "valid"
    return "none"


def verdict_opinions(steps: pa.Table) -> dict[str, dict[str, Opinion]]:
    """``solution_id -> {verifier: opinion}`` from the ``verdicts`` column of a steps table, for every
    step-level verifier that left a verdict in the solution, plus ``check`` (the step checks merged).
    A table without the column (a release from before step verifiers) has no opinions: ``{}``.

    Column-wise (a Python object per verdict cost ~1 µs per step, a third of a consensus export): a step's
    verdict of a verifier is its last one (rows of one step merged in table order); a verdict with no
    verifier name is ignored."""
    table = _opinion_table(steps)
    if table is None:
        return {}
    sids, groups = table
    out: dict[str, dict[str, Opinion]] = {sid: {} for sid in sids}
    results = [(s, merged, names[v], None if o == NO_OPINION else o)
               for sol, verifier, opinion, names, merged in groups
               for s, v, o in zip(sol.tolist(), verifier.tolist(), opinion.tolist())]
    for code, _, name, opinion in sorted(results, key=lambda r: r[:3]):
        out[sids[code]][name] = opinion
    return out


def verifier_opinions(steps: pa.Table, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One verifier's column of ``verdict_opinions`` as arrays: (the solution ids, whether the verifier has an
    opinion of each (``name in verdict_opinions(steps)[sid]``), that opinion with ``NO_OPINION`` for None)."""
    table = _opinion_table(steps)
    if table is None:
        return [], np.zeros(0, bool), np.zeros(0, np.int64)
    sids, groups = table
    has = np.zeros(len(sids), bool)
    opinions = np.full(len(sids), NO_OPINION, np.int64)
    for sol, verifier, opinion, names, _ in groups:  # merged step checks last: `check` is theirs if both
        if name in names:
            at = verifier == names.index(name)
            has[sol[at]] = True
            opinions[sol[at]] = opinion[at]
    return sids, has, opinions


def majority_arrays(steps: pa.Table, solution_ids: pa.Array, mc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``decide("majority", {**verdict_opinions(steps)[sid], MC: mc})`` for each of ``solution_ids`` (MC's
    opinion in ``mc``, ``NO_OPINION`` for None), column-wise: (keep, agreed first error, at least two decided
    opinions). A kept value has more than half the votes, so it is unique and no tie-break is needed."""
    n = len(solution_ids)
    vote_pos, vote_val = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    table = _opinion_table(steps)
    if table is not None and table[1]:
        sids, groups = table
        # Which solution of `solution_ids` each code is (one id may be several solutions: each gets its votes).
        at = pc.index_in(solution_ids, value_set=pa.array(sids, pa.string()))
        code_of = np.asarray(pc.fill_null(at, -1).to_numpy(zero_copy_only=False), np.int64)
        order = np.argsort(code_of, kind="stable")
        per_code = np.bincount(code_of[code_of >= 0], minlength=len(sids))
        first = np.searchsorted(code_of[order], np.arange(len(sids)))
        merged_check = np.zeros(len(sids), bool)
        for sol, _, _, _, merged in groups:
            if merged:
                merged_check[sol] = True
        for sol, verifier, opinion, names, merged in groups:
            # The dict's keys: MC's own entry replaces a verifier named `mc`; the merged `check` one named `check`.
            skip = [i for i, name in enumerate(names) if name == MC]
            use = (opinion != NO_OPINION) & ~np.isin(verifier, skip)
            if not merged and CHECK in names:
                use &= ~((verifier == names.index(CHECK)) & merged_check[sol])
            sol, opinion = sol[use], opinion[use]
            reps = per_code[sol]
            k = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
            vote_pos.append(order[np.repeat(first[sol], reps) + k])
            vote_val.append(np.repeat(opinion, reps))
    has_mc = mc != NO_OPINION
    vote_pos.append(np.flatnonzero(has_mc))
    vote_val.append(mc[has_mc])
    pos, val = np.concatenate(vote_pos), np.concatenate(vote_val)
    decided = np.bincount(pos, minlength=n)
    keep = np.zeros(n, bool)
    agreed = np.full(n, NO_OPINION, np.int64)
    if len(pos):
        by = np.lexsort((val, pos))
        pos, val = pos[by], val[by]
        new = np.r_[True, (pos[1:] != pos[:-1]) | (val[1:] != val[:-1])]
        starts = np.flatnonzero(new)
        votes = np.diff(np.r_[starts, len(pos)])
        p, v = pos[starts], val[starts]
        win = votes * 2 > decided[p]
        keep[p[win]] = True
        agreed[p[win]] = v[win]
    enough = decided >= 2
    keep &= enough
    agreed[~keep] = NO_OPINION
    return keep, agreed, enough


def _opinion_table(steps: pa.Table) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray, np.ndarray, list[str], bool]]] | None:
    """The opinions of ``verdict_opinions`` as arrays: the solution ids (codes index them) and groups of
    (solution code, verifier index into names, opinion (``NO_OPINION`` for None), names, merged step checks?),
    each solution's own verifiers first, then ``check``. None for a table without verdicts."""
    if "verdicts" not in steps.column_names or steps.num_rows == 0:
        return None
    t = steps.select(["solution_id", "step_index", "verdicts"]).combine_chunks()
    idx = np.asarray(pc.fill_null(t.column("step_index").chunk(0), -1).to_numpy(zero_copy_only=False), np.int64)
    runs = _runs_in_order(t.column("solution_id").chunk(0), idx)
    if runs is not None:  # already in (solution, step_index) order: the sort below would leave it as it is
        dictionary, sol = runs
        order = None
        s_sol, s_idx = sol, idx
    else:
        sol_codes = pc.dictionary_encode(t.column("solution_id").chunk(0), null_encoding="encode")
        dictionary = sol_codes.dictionary
        sol = np.asarray(sol_codes.indices.to_numpy(zero_copy_only=False), np.int64)
        # Rows in (solution, step_index) order, ties (rows of one step) in table order; `step` numbers distinct steps.
        order = np.lexsort((idx, sol))
        s_sol, s_idx = sol[order], idx[order]
    new_sol = np.r_[True, s_sol[1:] != s_sol[:-1]]
    step_sorted = np.cumsum(new_sol | np.r_[True, s_idx[1:] != s_idx[:-1]]) - 1
    sol_of_step = s_sol[np.r_[True, step_sorted[1:] != step_sorted[:-1]]]
    first_step = np.searchsorted(sol_of_step, sol_of_step, "left")  # per step: its solution's first step
    pos_of_step = np.arange(len(sol_of_step)) - first_step
    steps_in_sol = np.bincount(sol_of_step, minlength=len(dictionary))
    if order is None:
        step_of_row = step_sorted
    else:
        step_of_row = np.empty(len(order), np.int64)
        step_of_row[order] = step_sorted
    verdicts = t.column("verdicts").chunk(0)
    flat = pc.list_flatten(verdicts)
    names = pc.struct_field(flat, "verifier")
    keep = np.asarray(names.is_valid().to_numpy(zero_copy_only=False), bool)
    row = np.asarray(pc.list_parent_indices(verdicts).to_numpy(zero_copy_only=False), np.int64)[keep]
    name_codes = pc.dictionary_encode(names.filter(pa.array(keep)))
    verifier = np.asarray(name_codes.indices.to_numpy(zero_copy_only=False), np.int64)
    status = _status_codes(pc.struct_field(flat, "status").filter(pa.array(keep)))
    vocabulary = name_codes.dictionary.to_pylist()
    # The last verdict of each (step, verifier): entries sorted by (step, verifier), table order kept on ties.
    step = step_of_row[row]
    sids = dictionary.to_pylist()
    if not len(step):
        return sids, []
    by = np.lexsort((verifier, step))
    step, verifier, status = step[by], verifier[by], status[by]
    last = np.r_[(step[1:] != step[:-1]) | (verifier[1:] != verifier[:-1]), True]
    step, verifier, status = step[last], verifier[last], status[last]
    checks = np.isin(verifier, [i for i, n in enumerate(vocabulary) if n in STEP_CHECKS])
    own = ~checks
    groups = [(*_group_opinions(sol_of_step, pos_of_step, steps_in_sol, step[own], verifier[own], status[own]),
               vocabulary, False)]
    if checks.any():
        # The step checks merged per step: invalid if either says so, else undecided if either has an error or a
        # timeout, else valid if either checked something, else none (`_merge_checks`).
        c_step, c_status = step[checks], status[checks]
        first = np.r_[True, c_step[1:] != c_step[:-1]]
        starts = np.flatnonzero(first)
        merged = np.where(np.logical_or.reduceat(c_status == _INVALID, starts), _INVALID,
                          np.where(np.logical_or.reduceat(c_status == _UNDECIDED, starts), _UNDECIDED,
                                   np.where(np.logical_or.reduceat(c_status == _VALID, starts), _VALID, _NONE)))
        groups.append((*_group_opinions(sol_of_step, pos_of_step, steps_in_sol, c_step[first],
                                        np.zeros(len(starts), np.int64), merged), [CHECK], True))
    return sids, groups


def _runs_in_order(ids: pa.Array, idx: np.ndarray) -> tuple[pa.Array, np.ndarray] | None:
    """Where the rows are runs of one solution each (no null id, no id in two runs) with ``idx`` non-decreasing
    in each run, as a stream of whole solutions reads them: the ids in order and each row's run, which is
    ``dictionary_encode``'s answer (codes in order of first appearance) for rows that (solution, step_index)
    order leaves in place. Hashes one id per solution instead of one per row (at 1M steps the encode and the
    lexsort were a third of ``_opinion_table``). None otherwise."""
    n = len(ids)
    if n < 2 or ids.null_count:
        return None
    new = np.r_[True, np.asarray(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False), bool)]
    if (np.diff(idx)[~new[1:]] < 0).any():
        return None
    starts = np.flatnonzero(new)
    run_ids = ids.take(pa.array(starts))
    if len(pc.unique(run_ids)) != len(starts):
        return None
    return run_ids, np.cumsum(new) - 1


# Status codes of the column-wise `verdict_opinions`. Error and timeout are undecided; so is any other status
# (null, unknown) of one verifier, but among the step checks such a status merges as none, as `_merge_checks` does.
_VALID, _INVALID, _NONE, _UNDECIDED, _OTHER = 0, 1, 2, 3, 4


def _status_codes(status: pa.Array) -> np.ndarray:
    out = np.full(len(status), _OTHER, np.int8)
    for code, name in ((_VALID, "valid"), (_INVALID, "invalid"), (_NONE, "none"), (_UNDECIDED, "error"),
                       (_UNDECIDED, "timeout")):
        out[np.asarray(pc.fill_null(pc.equal(status, name), False).to_numpy(zero_copy_only=False), bool)] = code
    return out


def _group_opinions(sol_of_step: np.ndarray, pos_of_step: np.ndarray, steps_in_sol: np.ndarray, step: np.ndarray,
                    verifier: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``first_error_opinion`` of each (solution, verifier) with at least one verdict, over its solution's steps
    in order, a step without its verdict counting as undecided: (solution, verifier, opinion (``NO_OPINION`` for
    None)) per group. One verdict per (step, verifier) given."""
    if not len(step):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    sol, pos = sol_of_step[step], pos_of_step[step]
    by = np.lexsort((pos, verifier, sol))
    sol, verifier, pos, status = sol[by], verifier[by], pos[by], status[by]
    first = np.r_[True, (sol[1:] != sol[:-1]) | (verifier[1:] != verifier[:-1])]
    starts = np.flatnonzero(first)
    rank = np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
    big = np.iinfo(np.int64).max
    # The first step without a verdict: the first rank whose position skips one, else the count if short.
    skipped = np.minimum.reduceat(np.where(pos != rank, rank, big), starts)
    count = np.diff(np.r_[starts, len(pos)])
    missing = np.where(skipped != big, skipped, np.where(count < steps_in_sol[sol[starts]], count, big))
    invalid = np.minimum.reduceat(np.where(status == _INVALID, pos, big), starts)
    undecided = np.minimum.reduceat(np.where((status == _UNDECIDED) | (status == _OTHER), pos, big), starts)
    all_none = np.logical_and.reduceat(status == _NONE, starts)
    opinion = np.where((invalid < undecided) & (invalid < missing), invalid,
                       np.where((undecided != big) | (missing != big) | all_none, NO_OPINION, -1))
    return sol[starts], verifier[starts], opinion.astype(np.int64)


@dataclass(frozen=True)
class Decision:
    """A rule's verdict on one solution: keep it or not, its agreed first error, and why."""

    keep: bool
    first_error: Opinion
    reason: str  # kept | disagree | <who> undecided | no majority | too few opinions


def decide(rule: str, opinions: Mapping[str, Opinion]) -> Decision:
    """Apply ``rule`` to one solution's opinions (keys ``mc``, ``judge``, ``check``, other verifiers)."""
    mc = opinions.get(MC)
    if rule == "none":
        return Decision(mc is not None, mc, "kept" if mc is not None else "mc undecided")
    if rule in _PARTNER:
        other = _PARTNER[rule]
        theirs = opinions.get(other)
        if mc is None:
            return Decision(False, None, "mc undecided")
        if theirs is None:
            return Decision(False, None, f"{other} undecided")
        return Decision(True, mc, "kept") if mc == theirs else Decision(False, None, "disagree")
    if rule == "majority":
        # The step checks vote once, merged, not once per check.
        decided = [v for k, v in opinions.items() if v is not None and k not in STEP_CHECKS]
        if len(decided) < 2:
            return Decision(False, None, "too few opinions")
        (value, votes), *rest = Counter(decided).most_common()
        if votes * 2 > len(decided):
            return Decision(True, value, "kept")
        return Decision(False, None, "no majority")
    raise StorageError(f"`consensus` must be one of {list(RULES)}, got {rule!r}.", field="consensus", value=rule)


@dataclass
class ConsensusReport:
    """What a rule kept and dropped, for ``export.json`` and the CLI."""

    rule: str
    solutions: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    relabelled: int = 0  # kept with a first error other than MC's (majority only)
    unit: str = "solutions"  # what was counted (pair exports count pairs)

    @property
    def kept_share(self) -> float:
        return self.kept / self.solutions if self.solutions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "unit": self.unit, "total": self.solutions, "kept": self.kept,
                "kept_share": round(self.kept_share, 6), "dropped": dict(sorted(self.dropped.items())),
                "relabelled": self.relabelled, "line": self.line()}

    def line(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        extra = f"; {self.relabelled} relabelled by the majority" if self.relabelled else ""
        return (f"consensus {self.rule}: kept {self.kept} of {self.solutions} {self.unit} "
                f"({100 * self.kept_share:.1f} %); dropped: {dropped}{extra}")


def _require(rule: str, opinions: Mapping[str, Mapping[str, Opinion]]) -> None:
    """A two-party rule on a release that has no verdict of the partner at all is a usage error (it would
    silently drop every row), reported with what to do."""
    needed = _PARTNER.get(rule)
    if needed is None:
        return
    if not any(needed in ops for ops in opinions.values()):
        what = _PARTNER_HOW[needed]
        raise StorageError(
            f"`consensus={rule}` needs {what} verdicts in `steps.verdicts`, and this release has none: build it "
            f"with that verifier on, or export with `consensus=none` or `majority`.", field="consensus", value=rule)


def agreement(rows: Iterable[Mapping[str, Opinion]], names: Sequence[str] = (MC, JUDGE, CHECK)) -> list[dict[str, Any]]:
    """Pairwise agreement on the first error: for each pair of opinion sources, on how many solutions both
    were decided, and the share of those on which they name the same first error (``None`` if never both)."""
    rows = list(rows)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [(r.get(a), r.get(b)) for r in rows if r.get(a) is not None and r.get(b) is not None]
            same = sum(x == y for x, y in both)
            out.append({"a": a, "b": b, "both_decided": len(both), "agree": same,
                        "rate": round(same / len(both), 6) if both else None})
    return out
