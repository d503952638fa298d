"""The pairs table as a stream for the pair exports (``trl-dpo``, ``step-dpo``): the kinds/margin selection and
the consensus filter, batch by batch, in the stored order (``ReleaseData.table("pairs")``'s).

**Consensus without the whole steps table.** A rule keeps a pair when a kept solution of the same problem has its
agreed first error at the pair's rejected step and none contradicts its chosen step: everything a pair's decision needs lies in its own problem. So a first pass reads
the pairs merged by problem across their files (``stream.problem_batches``: runs of whole problems) beside the
steps as runs of whole solutions in the same problem order (``stream.solution_batches``), decides each run of
problems with ``pair_keep_columns``, and keeps one bool per pair (its part and row say where it goes); the second
pass streams the pairs in stored order and keeps the marked ones. Memory: a batch of each table, one problem's
kept solutions (step texts) beyond it, and one byte per pair.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.consensus import ConsensusReport
from storage.exports.base import ExportBatch, ReleaseData
from storage.exports.pair_columns import PairColumns
from storage.exports.stream import (PART, ROW, ProblemLookup, Solutions, StreamConsensus, kept_steps, problem_batches,
                                    solution_batches, step_labels, table_batches)

__all__ = ["pair_batches", "pair_record_batches", "pair_keep_columns"]

_PAIR_COLUMNS = ["prefix_steps", "chosen", "rejected", "kind", "margin"]


def _selected(t: pa.Table, kinds: list[str] | None, min_margin: float | None) -> pa.Array | None:
    """Rows of a pairs batch the kinds and margin options keep (None: all)."""
    mask = None
    if kinds is not None:
        mask = pc.is_in(t.column("kind"), value_set=pa.array(kinds, pa.string()))
    if min_margin is not None:
        margin = pc.fill_null(pc.greater_equal(t.column("margin"), min_margin), False)
        mask = margin if mask is None else pc.and_(mask, margin)
    return mask


class _Decided:
    """The steps' kept solutions with a first error, in problem order, handed out problem by problem: each run of
    solutions is decided as it is read (counted in ``consensus``'s report) and dropped once handed out. A
    solution is a row (problem_id, its step texts, its agreed first error)."""

    def __init__(self, data: ReleaseData, consensus: StreamConsensus, presort: bool) -> None:
        # What the first-error rule's labels read (`step_labels`), not every label column, and of the verdicts
        # what the rules read: less to decode.
        self._runs = solution_batches(data, ["step_text", "mc_k", "first_error_index", "verdicts"], presort=presort,
                                      opinions_only=True)
        self._consensus = consensus
        self._pending: list[pa.Table] = []
        self._last: str | None = None  # problem_id of the last solution read
        self._done = False

    def _read(self) -> None:
        b = next(self._runs, None)
        if b is None:
            self._done = True
            return
        if not b.count:
            return
        # MC's opinion is the first-error rule's, the one the pair makers used.
        keep, agreed, _ = self._consensus.decisions(b, *step_labels(b, "first-error", 0.0, "infer"))
        kept = _kept(b, keep & (agreed >= 0), agreed)
        if kept.num_rows:
            self._pending.append(kept)
        self._last = b.steps.column("problem_id")[b.steps.num_rows - 1].as_py()

    def through(self, problem_id: str) -> pa.Table:
        """Every kept solution of the problems up to ``problem_id`` not handed out yet."""
        while not self._done and (self._last is None or self._last <= problem_id):
            self._read()  # the last run read may end inside problem_id: read on until past it
        pending = pa.concat_tables(self._pending) if self._pending else _kept_empty()
        later = pc.fill_null(pc.greater(pending.column("problem_id"), problem_id), False)
        self._pending = [pending.filter(later)]
        return pending.filter(pc.invert(later))

    def finish(self) -> dict[str, Any]:
        """Decide the solutions after the last pair's problem (the report counts every solution); the report."""
        while not self._done:
            self._read()
            self._pending = []
        return self._consensus.finish().as_dict()


_KEPT = pa.schema([("problem_id", pa.string()), ("steps", pa.list_(pa.string())), ("first_error", pa.int64())])


def _kept_empty() -> pa.Table:
    return _KEPT.empty_table()


def _kept(b: Solutions, keep: np.ndarray, agreed: np.ndarray) -> pa.Table:
    """The solutions whose decision can confirm or contradict a pair (kept, with a first error): their problem,
    step texts and agreed first error."""
    rows, offsets = kept_steps(b, keep)
    texts = b.column("step_text").take(pa.array(rows))
    return pa.table([b.per_solution("problem_id").filter(pa.array(keep)),
                     pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), texts),
                     pa.array(agreed[keep], pa.int64())], schema=_KEPT)


def _prefix_ids(roots: np.ndarray, lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """For sequences of codes laid one after another (``lengths`` each, ``roots`` their first element's parent):
    per element, an id of the sequence's prefix through it, equal for two elements exactly when their prefixes
    are (same root, same codes; the level in the high bits). A trie, one level at a time: a node is its parent's
    id and its own code, numbered by ``np.unique``."""
    starts = (np.cumsum(lengths) - lengths).astype(np.int64)
    out = np.empty(len(codes), np.int64)
    parent = roots.astype(np.int64)
    width = int(codes.max(initial=0)) + 1
    active = np.arange(len(lengths))
    for level in range(int(lengths.max(initial=0))):
        active = active[lengths[active] > level]
        at = starts[active] + level
        _, ids = np.unique(parent[active] * width + codes[at], return_inverse=True)
        ids = ids.reshape(-1).astype(np.int64)
        parent[active] = ids
        out[at] = (level << 40) | ids
    return out


def _codes(values: list[pa.Array]) -> np.ndarray:
    """One code per string (a null included) of ``values`` concatenated, equal exactly when the strings are."""
    joined = pa.concat_arrays([v.cast(pa.string()) for v in values])
    return np.asarray(pc.dictionary_encode(joined, null_encoding="encode").indices.to_numpy(zero_copy_only=False),
                      np.int64)


def _codes_beside(texts: pa.Array, values: list[pa.Array]) -> np.ndarray:
    """``_codes([texts, *values])`` up to the codes of strings that only ``texts`` has, which all share one code
    (no other string has it). The trie below only ever asks whether a pair's prefix is some solution's, so a
    solution step no pair has can stand for any other: and looking the many solution steps up among the pairs'
    few strings (``index_in``) is cheaper than hashing every one into the dictionary (a third of the pair
    filter's CPU at 1M steps), and copies none of them."""
    enc = pc.dictionary_encode(pa.concat_arrays([v.cast(pa.string()) for v in values]), null_encoding="encode")
    absent = len(enc.dictionary)
    found = pc.fill_null(pc.index_in(texts.cast(pa.string()), value_set=enc.dictionary), absent)
    return np.r_[np.asarray(found.to_numpy(zero_copy_only=False), np.int64),
                 np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]


def pair_keep_columns(pairs: pa.Table, solutions: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    """Which pairs a rule keeps, column-wise (the per-pair version it is checked against is
    ``tests/export_reference.py``'s ``pair_keep_mask``): ``pairs`` (problem_id, prefix_steps, chosen, rejected), the
    ``solutions`` of ``_kept`` (each kept, with a first error). Every step sequence (a solution's steps, each
    pair's prefix + rejected and prefix + chosen) goes into one trie of (problem, steps) prefixes, so "some kept
    solution's first error is exactly this prefix" and "some kept solution calls this prefix bad" are integer
    set lookups, the same answers as its tuples (a tuple of every prefix per solution was a fifth of the CPU)."""
    n = pairs.num_rows
    sol_steps = solutions.column("steps").combine_chunks()
    sol_len = np.asarray(pc.list_value_length(sol_steps).to_numpy(zero_copy_only=False), np.int64)
    prefix = pairs.column("prefix_steps").combine_chunks()
    pre_len = np.asarray(pc.fill_null(pc.list_value_length(prefix), 0).to_numpy(zero_copy_only=False), np.int64)
    sol_flat, pre_flat = pc.list_flatten(sol_steps), pc.list_flatten(prefix)
    codes = _codes_beside(sol_flat, [pre_flat, pairs.column("rejected").combine_chunks(), pairs.column("chosen").combine_chunks()])
    # Sequences: the solutions, then each pair's prefix + rejected, then each pair's prefix + chosen.
    pre_start = len(sol_flat) + (np.cumsum(pre_len) - pre_len).astype(np.int64)
    pair_len = pre_len + 1
    within = np.arange(int(pair_len.sum())) - np.repeat((np.cumsum(pair_len) - pair_len), pair_len)
    pair_of = np.repeat(np.arange(n), pair_len)
    last = within == pre_len[pair_of]
    rej_at = np.where(last, len(sol_flat) + len(pre_flat) + pair_of, pre_start[pair_of] + within)
    cho_at = np.where(last, len(sol_flat) + len(pre_flat) + n + pair_of, rej_at)
    roots = _codes([solutions.column("problem_id").combine_chunks(), pairs.column("problem_id").combine_chunks()])
    ids = _prefix_ids(np.r_[roots, roots[len(sol_len):]], np.r_[sol_len, pair_len, pair_len],
                      np.r_[codes[: len(sol_flat)], codes[rej_at], codes[cho_at]])
    # A solution's first error is its prefix through min(f + 1, L) steps; it calls bad those through f + 1 .. L.
    first_error = np.asarray(solutions.column("first_error").to_numpy(), np.int64)
    sol_start = (np.cumsum(sol_len) - sol_len).astype(np.int64)
    firsts = ids[sol_start + np.minimum(first_error + 1, sol_len) - 1] if len(sol_len) else np.zeros(0, np.int64)
    pos = np.arange(len(sol_flat)) - np.repeat(sol_start, sol_len)
    bad = ids[: len(sol_flat)][pos >= np.repeat(first_error, sol_len)]
    pair_end = len(sol_flat) + np.cumsum(pair_len) - 1
    confirmed = np.isin(ids[pair_end], firsts)
    contradicted = confirmed & np.isin(ids[pair_end + int(pair_len.sum())], bad)
    dropped = {"unconfirmed": int((~confirmed).sum()), "chosen contradicted": int(contradicted.sum())}
    return confirmed & ~contradicted, {k: v for k, v in dropped.items() if v}


class _Marks:
    """One bool per pair of each part, set where the rule keeps it; laid out in stored order at the end."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._rows: list[int] = []

    def add(self, part: np.ndarray, row: np.ndarray, keep: np.ndarray) -> None:
        for p in np.unique(part).tolist():
            while len(self._parts) <= p:
                self._parts.append(np.zeros(0, bool))
                self._rows.append(0)
            at = part == p
            rows = row[at]
            self._rows[p] = max(self._rows[p], int(rows.max()) + 1)
            if self._rows[p] > len(self._parts[p]):  # grow by doubling: amortised O(1) per row
                grown = np.zeros(max(self._rows[p], 2 * len(self._parts[p])), bool)
                grown[: len(self._parts[p])] = self._parts[p]
                self._parts[p] = grown
            self._parts[p][rows] = keep[at]

    def stored_order(self) -> np.ndarray:
        """The marks of every pair, part after part (the order ``table_batches`` reads them)."""
        return np.concatenate([m[:n] for m, n in zip(self._parts, self._rows)] or [np.zeros(0, bool)])


def _consensus_keep(data: ReleaseData, kinds: list[str] | None, min_margin: float | None, rule: str,
                    presort: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Whether the rule keeps each pair (in stored order) and the report: pairs kept and dropped (why), and the
    rule's report over the solutions."""
    consensus = StreamConsensus(rule)
    decided = _Decided(data, consensus, presort)
    marks = _Marks()
    report = ConsensusReport(rule, unit="pairs")
    for t in problem_batches(data, "pairs", _PAIR_COLUMNS, presort=presort, numbered=True):
        part, row = t.column(PART).to_numpy(), t.column(ROW).to_numpy()
        keep = np.zeros(t.num_rows, bool)
        picked = _selected(t, kinds, min_margin)
        at = np.arange(t.num_rows) if picked is None else np.flatnonzero(picked.to_numpy(zero_copy_only=False))
        if len(at):
            pairs = t.take(pa.array(at))
            solutions = decided.through(pairs.column("problem_id")[pairs.num_rows - 1].as_py())
            mask, dropped = pair_keep_columns(pairs, solutions)
            keep[at] = mask
            report.solutions += len(at)
            report.kept += int(mask.sum())
            for why, n in dropped.items():
                report.dropped[why] = report.dropped.get(why, 0) + n
        marks.add(part, row, keep)
    by_solution = decided.finish()
    out = report.as_dict()
    out["solutions"] = by_solution
    return marks.stored_order(), out


def pair_batches(data: ReleaseData, kinds: list[str] | None, min_margin: float | None, consensus: str = "none",
                 presort: bool = False) -> tuple[Iterator[pa.Table], Callable[[], dict[str, Any]]]:
    """The pairs an export keeps (``kinds``, ``min_margin``, then the ``consensus`` rule), as batches read file
    by file in stored order, and a function giving the report once they are consumed. With a rule, its first
    pass (see the module's doc) runs before the first batch comes out, so its errors (a rule whose partner
    left no verdict) come before any record's."""
    count = [0]
    state: dict[str, Any] = {}

    def batches() -> Iterator[pa.Table]:
        keep = None
        if consensus != "none":
            keep, state["report"] = _consensus_keep(data, kinds, min_margin, consensus, presort)
        start = 0
        for t in table_batches(data, "pairs"):
            mask = _selected(t, kinds, min_margin)
            if keep is not None:
                ours = pa.array(keep[start: start + t.num_rows])
                mask = ours if mask is None else pc.and_(mask, ours)
            start += t.num_rows
            if mask is not None:
                t = t.filter(mask)
            count[0] += t.num_rows
            yield t

    def report() -> dict[str, Any]:
        if "report" in state:
            return state["report"]
        r = ConsensusReport("none", unit="pairs")
        r.solutions = r.kept = count[0]
        return r.as_dict()

    return batches(), report


def pair_record_batches(data: ReleaseData, kinds: list[str] | None, min_margin: float | None, consensus: str,
                        schema: pa.Schema, records: Callable[[list[dict], dict[str, dict]], list[dict]],
                        presort: bool = False,
                        columns: Callable[[PairColumns], dict[str, pa.Array] | None] | None = None):  # -> ExportStream.batches
    """A pair export's ``ExportStream.batches``: for each batch of ``pair_batches``, its records as ``columns(the
    batch's PairColumns)`` builds them column-wise, or where that gives None (or ``PairColumns.of`` does),
    ``records(pairs, their problems)`` (a pair as a dict only while its batch is built; the problems table stays
    Arrow, see ``ProblemLookup.dicts``); as Arrow batches of ``schema``; the row count and the consensus report
    at the end. Both must give the same records."""
    batches, report = pair_batches(data, kinds, min_margin, consensus, presort)
    lookup = ProblemLookup(data.table("problems"))
    n = 0
    for t in batches:
        cols = None if columns is None else PairColumns.of(t, data.renderer, lookup)
        arrays = None if cols is None else columns(cols)
        if arrays is not None:
            n += t.num_rows
            yield ExportBatch(pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema))
            continue
        rows = t.to_pylist()
        out = records(rows, lookup.dicts([r["problem_id"] for r in rows]))
        n += len(out)
        yield ExportBatch(pa.RecordBatch.from_pylist(out, schema=schema))
    return {"rows": n, "consensus": report()}, []
