"""The steps table as a stream of whole solutions, and the label rules and consensus filter over it in Arrow /
NumPy, so the step exports run in record batches instead of whole tables and Python loops per solution.

**Order.** Today's exports emit solutions in (problem_id, solution_id) order with steps in step_index order,
i.e. a stable sort of the concatenated shard files. Each shard file is written sorted (``schema.to_table``),
but shards follow source order, not problem order, so the files are merged: every file is read batch by
batch, and all buffered rows whose (problem_id, solution_id) is below the smallest "last key" of the files
that still have rows to come are emitted. No later row can sort before them, and no solution below that
key can continue, so each emitted chunk is a run of whole solutions in global order. Memory: about one
batch per open file (the per-file batch is ``batch_rows / files``, at least ``MIN_FILE_BATCH``), plus the
Parquet reader's current row group.

The same merge reads any table whose files are sorted by problem (``problem_batches``: the pairs, sorted by
(problem_id, pair_id)) as runs of whole problems, for exports that group by problem (``rstar-ppm``) or decide
per problem (the pair exports' consensus filter, ``pair_stream``).

A part that turns out not sorted (hand-made tables; never a build's own files) restarts the stream with that
data sorted in memory: ``Unsorted`` is raised and ``stream_export`` reruns the exporter on sorted parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.consensus import (NO_OPINION, ConsensusReport, _PARTNER, _require, decide, majority_arrays,
                               verifier_opinions)
from storage.errors import StorageError
from storage.exports.verdict_columns import OPINIONS, opinion_leaves, opinions
from storage.schema import SCHEMAS, SORT_KEYS

__all__ = ["BATCH_ROWS", "Solutions", "solution_batches", "problem_batches", "table_batches", "stream_export", "step_labels", "StreamConsensus",
           "ProblemLookup", "json_escaped", "json_strings", "join_pieces", "string_offsets", "list_array", "kept_steps", "np_bool",
           "Unsorted"]

BATCH_ROWS = 1 << 16  # steps per batch: ~8 MB of step columns at 1M-row benchmark widths
# Rows per batch of the exports that build Python records per row (the pair exports): a row as a dict is
# ~50× its Arrow size.
RECORD_BATCH_ROWS = 1 << 13
MIN_FILE_BATCH = 1024
KEYS = ("problem_id", "solution_id", "step_index")
# Columns `_parts_for(..., numbered=True)` adds: which part a row came from and its position there, so a
# decision made in merged order can be laid back onto the stored order.
PART, ROW = "_part", "_row"


class Unsorted(Exception):
    """A part of a table is not in its key order (the steps: (problem_id, solution_id, step_index))."""


@dataclass(frozen=True)
class _Order:
    """How a merged table is ordered: by ``keys``; a unit that is never split across two chunks is a run of rows
    with equal first ``whole`` keys (a solution: 2, a problem: 1)."""

    keys: tuple[str, ...]
    whole: int


_SOLUTIONS = _Order(KEYS, 2)


def _problems_of(name: str) -> _Order:
    return _Order(tuple(SORT_KEYS[name]), 1)


# --- reading whole solutions (or problems) in order --------------------------------------------------


def _lex(t: pa.Table, names: Sequence[str], op: str, other: Sequence[Any]) -> pa.ChunkedArray | pa.Array:
    """Per row of ``t``: (t[names]) ``op`` ``other`` in lexicographic order, ``op`` "less" or "greater_equal"; each
    of ``other`` a scalar or an array as long as ``t``."""
    cols = [t.column(k) for k in names]
    last = pc.less(cols[-1], other[-1]) if op == "less" else pc.greater_equal(cols[-1], other[-1])
    strict = pc.less if op == "less" else pc.greater
    for c, o in zip(cols[-2::-1], other[-2::-1]):
        last = pc.or_(strict(c, o), pc.and_(pc.equal(c, o), last))
    return last


def _key_ok(t: pa.Table, keys: Sequence[str] = KEYS) -> bool:
    """Rows in non-decreasing ``keys`` order (null keys are refused before, `_no_null_keys`)."""
    t = t.select(list(keys)).combine_chunks()
    n = t.num_rows
    if n < 2:
        return True
    ok = _lex(t.slice(1), keys, "greater_equal", [t.column(k).slice(0, n - 1) for k in keys])
    return bool(pc.all(ok).as_py())


def _no_null_keys(t: pa.Table, keys: Sequence[str], name: str) -> None:
    """A row without a key has no place in the order, sorted or not: a record error, not ``Unsorted``."""
    for k in keys:
        col = t.column(k)
        if col.null_count:
            j = int(np.flatnonzero(~np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool))[0])
            where = ", ".join(f"{c}={t.column(c)[j].as_py()!r}" for c in keys)
            raise StorageError(f"{name}[{where}]: {k} is null; every {name} row needs {', '.join(keys)}.", field=k)


def _first_key(t: pa.Table, keys: Sequence[str]) -> tuple:
    return tuple(t.column(k)[0].as_py() for k in keys)


def _last_key(t: pa.Table, keys: Sequence[str]) -> tuple:
    return tuple(t.column(k)[t.num_rows - 1].as_py() for k in keys)


class _Part:
    """One sorted source of rows (a Parquet file or an in-memory table) with a buffer of read rows."""

    def __init__(self, batches: Iterator[pa.Table], order: _Order = _SOLUTIONS, name: str = "steps") -> None:
        self._batches = batches
        self.order = order
        self.name = name
        self.buf: pa.Table | None = None
        self.done = False  # no batches left to read (rows may remain in buf)
        self._last: tuple | None = None

    def fill(self) -> None:
        """Append batches until the buffer has a row or the part is exhausted; check the order as it goes."""
        while not self.done and (self.buf is None or self.buf.num_rows == 0):
            self.read_one()

    def read_one(self) -> None:
        batch = next(self._batches, None)
        if batch is None:
            self.done = True
            return
        if batch.num_rows == 0:
            return
        keys = self.order.keys
        _no_null_keys(batch, keys, self.name)
        if not _key_ok(batch, keys) or (self._last is not None and _first_key(batch, keys) < self._last):
            raise Unsorted()
        self._last = _last_key(batch, keys)
        self.buf = batch if self.buf is None or self.buf.num_rows == 0 else pa.concat_tables([self.buf, batch])

    @property
    def last(self) -> tuple:
        """The whole-unit key (e.g. (problem_id, solution_id)) of the last buffered row."""
        assert self.buf is not None and self.buf.num_rows
        return _last_key(self.buf, self.order.keys[: self.order.whole])


def _below(t: pa.Table, names: Sequence[str], key: tuple) -> int:
    """How many leading rows of sorted ``t`` have (``names``) < key."""
    return int(pc.sum(_lex(t, names, "less", [pa.scalar(k, t.schema.field(n).type) for n, k in zip(names, key)])).as_py() or 0)


def _merged(parts: list[_Part], order: _Order = _SOLUTIONS) -> Iterator[pa.Table]:
    """The parts merged in ``order``: chunks of whole units (every unit key below the smallest "last key" of the
    parts with rows still to come: no later row can sort before them or continue them)."""
    whole = order.keys[: order.whole]
    for p in parts:
        p.fill()
    while True:
        live = [p for p in parts if not p.done]
        if not live:
            rest = [p.buf for p in parts if p.buf is not None and p.buf.num_rows]
            if rest:
                yield _in_order(rest, order.keys)
            return
        water = min(p.last for p in live)
        chunks = []
        for p in parts:
            if p.buf is not None and p.buf.num_rows:
                n = _below(p.buf, whole, water)
                if n:
                    chunks.append(p.buf.slice(0, n))
                    p.buf = p.buf.slice(n)
        for p in live:
            if p.last == water:
                p.read_one()  # the part at the watermark must read on, or nothing below it would ever move
                p.fill()
        if chunks:
            yield _in_order(chunks, order.keys)


def _in_order(chunks: list[pa.Table], keys: Sequence[str] = KEYS) -> pa.Table:
    """Chunks from several parts: one table in key order (a stable sort keeps the parts' order on ties,
    as the whole-table sort of the concatenated files does)."""
    t = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
    if len(chunks) > 1 and not _key_ok(t, keys):
        t = t.sort_by([(k, "ascending") for k in keys])
    return t
@dataclass
class Solutions:
    """A run of whole solutions in order: the step rows, and where each solution starts."""

    steps: pa.Table
    starts: np.ndarray  # solution j is rows starts[j]:starts[j+1]
    sol: np.ndarray  # per step: its solution's index in this run
    pos: np.ndarray  # per step: its position in its solution (0-based)

    @classmethod
    def of(cls, steps: pa.Table) -> "Solutions":
        steps = steps.combine_chunks()
        n = steps.num_rows
        if n == 0:
            return cls(steps, np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        p, s = steps.column("problem_id"), steps.column("solution_id")
        new = pc.or_(pc.not_equal(p.slice(1), p.slice(0, n - 1)), pc.not_equal(s.slice(1), s.slice(0, n - 1)))
        first = np.flatnonzero(np.concatenate([[True], np_bool(new)]))
        starts = np.append(first, n).astype(np.int64)
        sol = np.repeat(np.arange(len(first)), np.diff(starts))
        pos = np.arange(n) - starts[sol]
        return cls(steps, starts, sol, pos)

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    def column(self, name: str) -> pa.Array:
        """Column ``name`` as one array: a copy (``combine_chunks`` copies even a single chunk), on purpose.
        Handing out the table's own chunk saves the copy but measured slower for math-shepherd at 1M steps
        (3 interleaved pairs at load 2: 0.55-0.72 s wall with the copy, 0.69-1.53 s without, the difference
        all system time); perhaps the decoded batch's buffers, made on the Parquet reader's threads, then
        live on in what the exporter builds. prm800k and trl-prm: no difference either way."""
        return self.steps.column(name).combine_chunks()

    def per_solution(self, name: str) -> pa.Array:
        """Column ``name`` at each solution's first step."""
        return self.column(name).take(pa.array(self.starts[:-1]))

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)


def np_bool(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), dtype=bool)


def _reduce_and(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.logical_and.reduceat(values, starts[:-1]) if len(starts) > 1 else np.zeros(0, bool)


def _parts_for(data: Any, columns: Sequence[str], batch_rows: int, presort: bool, name: str = "steps",
               order: _Order = _SOLUTIONS, numbered: bool = False, opinions_only: bool = False) -> list[_Part]:
    """Table ``name``'s sources: each Parquet file of the release, or the in-memory table. ``numbered``: each row
    carries its part (``PART``) and its position in it (``ROW``, in stored order, before any ``presort``).
    ``opinions_only``: the files' ``verdicts`` as ``verdict_columns.OPINIONS`` (read cut where the file allows)."""
    schema = SCHEMAS[name]
    want = list(dict.fromkeys([*order.keys, *columns]))
    cut = opinions_only and "verdicts" in want

    def fill_missing(t: pa.Table) -> pa.Table:
        # Files from before a column existed (e.g. `verdicts`) read as nulls, as the dataset reader does.
        for col in want:
            if col not in t.column_names:
                t = t.append_column(schema.field(col), pa.nulls(t.num_rows, schema.field(col).type))
        return t.select(want)

    def narrow(t: pa.Table) -> pa.Table:
        # Files only: every file's batches get one type (a file without verdicts has nulls of the whole type),
        # since the merge concatenates them. A table in memory is one part, decoded already: left as it is.
        if not cut:
            return t
        return t.set_column(t.column_names.index("verdicts"), pa.field("verdicts", OPINIONS), opinions(t.column("verdicts")))

    def number(t: pa.Table, part: int, start: int) -> pa.Table:
        if not numbered:
            return t
        t = t.append_column(PART, pa.array(np.full(t.num_rows, part, np.int64)))
        return t.append_column(ROW, pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))

    def sorted_batches(t: pa.Table) -> Iterator[pa.Table]:
        t = t.sort_by([(k, "ascending") for k in order.keys]) if presort else t
        for b in t.to_batches(max_chunksize=batch_rows):
            yield pa.Table.from_batches([b], t.schema)

    mem = data.in_memory(name)
    if mem is not None:
        return [_Part(sorted_batches(number(fill_missing(mem), 0, 0)), order, name)]
    paths = data.part_paths(name)
    per_file = max(MIN_FILE_BATCH, batch_rows // max(1, len(paths)))
    fs = data.filesystem()

    def file_batches(path: str, part: int) -> Iterator[pa.Table]:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in want if c in pf.schema_arrow.names]
            leaves = opinion_leaves(pf.schema) if cut and "verdicts" in cols else None
            if leaves is not None:  # only the fields the rules read: less to decode
                cols = [c for c in cols if c != "verdicts"] + leaves
            if presort:
                yield from sorted_batches(number(data.restrict(narrow(fill_missing(pf.read(columns=cols)))), part, 0))
                return
            start = 0
            for b in pf.iter_batches(batch_size=per_file, columns=cols):
                t = number(data.restrict(narrow(fill_missing(pa.Table.from_batches([b])))), part, start)
                start += t.num_rows
                yield t

    return [_Part(file_batches(p, i), order, name) for i, p in enumerate(paths)]


def solution_batches(data: Any, columns: Sequence[str], *, batch_rows: int | None = None,
                     presort: bool = False, opinions_only: bool = False) -> Iterator[Solutions]:
    """The release's steps (``columns`` plus the keys) as runs of whole solutions, in (problem_id,
    solution_id, step_index) order. Raises ``Unsorted`` if a part is out of order (unless ``presort``).
    ``opinions_only``: ``verdicts`` read from files holds each verdict's verifier and status only
    (``verdict_columns``; a table in memory keeps its own), for passes that read verdicts only through the
    consensus rules."""
    for chunk in _merged(_parts_for(data, columns, batch_rows or BATCH_ROWS, presort, opinions_only=opinions_only)):
        yield Solutions.of(chunk)


def problem_batches(data: Any, name: str, columns: Sequence[str], *, batch_rows: int | None = None,
                    presort: bool = False, numbered: bool = False) -> Iterator[pa.Table]:
    """Table ``name`` (``columns`` plus its sort keys, ``schema.SORT_KEYS``) as runs of whole problems in key
    order, its files merged as ``solution_batches`` merges the steps': all of a problem's rows, from every
    shard file, come in one chunk, and memory stays about one batch per file. ``numbered``: see
    ``_parts_for``. Raises ``Unsorted`` if a part is out of order (unless ``presort``)."""
    order = _problems_of(name)
    yield from _merged(_parts_for(data, columns, batch_rows or RECORD_BATCH_ROWS, presort, name, order, numbered), order)


def table_batches(data: Any, name: str, *, batch_rows: int | None = None) -> Iterator[pa.Table]:
    """Table ``name`` in the order ``ReleaseData.table`` gives it (its files one after another, each in its own
    order), in batches of at most ``batch_rows`` rows, read file by file; for per-row exports whose output
    follows the stored order (the pair exports)."""
    import pyarrow.dataset as pads

    rows = batch_rows or RECORD_BATCH_ROWS
    mem = data.in_memory(name)
    if mem is not None:
        for b in mem.to_batches(max_chunksize=rows):
            yield pa.Table.from_batches([b], mem.schema)
        return
    paths = data.part_paths(name)
    if not paths:
        yield SCHEMAS[name].empty_table()
        return
    # The dataset's schema, as `ReleaseData.table` reads it: columns a file lacks come back as nulls. Each
    # file is read with `iter_batches`, which decodes as it goes (a dataset scan decodes whole row groups).
    fs = data.filesystem()
    schema = pads.dataset(paths, format="parquet", filesystem=fs).schema
    for path in paths:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [n for n in schema.names if n in pf.schema_arrow.names]
            for b in pf.iter_batches(batch_size=rows, columns=cols, use_threads=False):
                t = pa.Table.from_batches([b])
                for fld in schema:
                    if fld.name not in t.column_names:
                        t = t.append_column(fld, pa.nulls(t.num_rows, fld.type))
                yield data.restrict(t.select(schema.names).cast(schema))


R = TypeVar("R")


def stream_export(run: Callable[[bool], R]) -> R:
    """Run ``run(presort)``: first streaming, and once more with each part sorted in memory if a part
    turned out unsorted (nothing is written before ``run`` returns, so the restart is clean).

    A record error in the streaming pass is only trusted after the sorted rerun: rows of an unsorted part
    read as if sorted form solutions that do not exist (a solution's first step alone, say), and one of
    those can fail a check (its problem missing) before the disorder shows, naming the wrong record or
    failing a release the sorted data exports. On sorted data the rerun raises the same error."""
    try:
        return run(False)
    except (Unsorted, StorageError):
        return run(True)


# --- label rules -------------------------------------------------------------------------------------


def step_labels(b: Solutions, rule: str, threshold: float, unestimated: str) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels per step and, per solution, whether it is labelled whole (the rest are None in
    ``labels.solution_labels``). Same rules as ``labels.first_error_labels`` and
    ``base.implied_hard_labels``, over a whole run of solutions at once."""
    t, starts, sol, pos = b.steps, b.starts, b.sol, b.pos
    k_true = np_bool(pc.not_equal(t.column("mc_k"), 0))  # `if k:` — null and 0 are falsy
    fe = b.per_solution("first_error_index")
    fe_valid = np.asarray(fe.is_valid().to_numpy(zero_copy_only=False), bool)
    fe_val = np.asarray(pc.fill_null(fe, 0).to_numpy(zero_copy_only=False), np.int64)
    fe_step_valid, fe_step = fe_valid[sol], fe_val[sol]
    if rule == "first-error":
        labels = np.where(fe_step_valid, pos < fe_step, True)
        last = starts[1:] - 1
        decided = fe_valid | (k_true[last] if len(last) else np.zeros(0, bool))
        if unestimated == "drop":
            decided &= _reduce_and(k_true, starts)
        return labels, decided
    v = t.column("mc_value")
    v_valid = np.asarray(v.is_valid().to_numpy(zero_copy_only=False), bool)
    all_valid = _reduce_and(v_valid, starts)
    if rule == "soft-drop":
        return _soft_drop(b, v, all_valid, fe_valid, fe_val)
    by_value = np_bool(pc.greater(v, pa.scalar(threshold, pa.float64())))
    if not (unestimated == "infer" and threshold == 0.0):
        return by_value, all_valid
    c_true = np_bool(pc.not_equal(t.column("mc_c"), 0))
    # later_estimated at step i: some step after i in its solution has rollouts.
    last_est = (np.maximum.reduceat(np.where(k_true, pos, -1), starts[:-1]) if b.count else np.zeros(0, np.int64))
    later = pos < last_est[sol]
    after_fe = fe_step_valid & (pos >= fe_step)
    implied = np.where(k_true, c_true, np.where(after_fe, False, later))
    undecided_step = ~k_true & ~after_fe & ~later
    implied_ok = ~(np.logical_or.reduceat(undecided_step, starts[:-1]) if b.count else np.zeros(0, bool))
    return np.where(all_valid[sol], by_value, implied), all_valid | implied_ok


def _soft_drop(b: Solutions, v: pa.ChunkedArray, all_valid: np.ndarray, fe_valid: np.ndarray,
               fe_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels.soft_drop_first_error`` for every solution at once: the first step whose c/k is below SOFT_DROP
    times the c/k before it (for step 0 the question's own, ``mc_value - advantage``; unknown: c/k == 0)."""
    from storage.exports.labels import SOFT_DROP

    starts, sol, pos = b.starts, b.sol, b.pos
    vals = np.asarray(pc.fill_null(v, np.nan).to_numpy(zero_copy_only=False), np.float64)
    first = starts[:-1]
    adv = b.per_solution("advantage")
    root_valid = np.asarray(adv.is_valid().to_numpy(zero_copy_only=False), bool) & ~np.isnan(vals[first]) \
        if b.count else np.zeros(0, bool)
    root = vals[first] - np.asarray(pc.fill_null(adv, 0.0).to_numpy(zero_copy_only=False), np.float64) \
        if b.count else np.zeros(0)
    before = np.empty_like(vals)
    before[1:] = vals[:-1]
    at_first = pos == 0
    before[at_first] = root[sol[at_first]]
    before_valid = ~at_first | root_valid[sol]
    with np.errstate(invalid="ignore"):
        drop = np.where(before_valid, vals < SOFT_DROP * before, vals == 0.0)
        last_positive = vals[starts[1:] - 1] > 0.0 if b.count else np.zeros(0, bool)
    big = np.iinfo(np.int64).max
    first_drop = np.minimum.reduceat(np.where(drop, pos, big), first) if b.count else np.zeros(0, np.int64)
    has_drop = first_drop != big
    fe = np.where(has_drop, first_drop, np.where(last_positive, -1, fe_val))
    decided = all_valid & (has_drop | last_positive | fe_valid)
    fe_step = fe[sol]
    return (fe_step == -1) | (pos < fe_step), decided


def mc_opinions(b: Solutions, labels: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """``consensus.labels_opinion`` per solution: the first step labelled bad, -1 if none, ``NO_OPINION`` if
    undecided."""
    big = np.iinfo(np.int64).max
    first_bad = np.minimum.reduceat(np.where(labels, big, b.pos), b.starts[:-1]) if b.count else np.zeros(0, np.int64)
    return np.where(decided, np.where(first_bad == big, -1, first_bad), NO_OPINION).astype(np.int64)


@dataclass
class StreamConsensus:
    """The consensus rule over a stream (the per-solution version it is checked against is
    ``tests/export_reference.py``'s ``apply_consensus``): per run of solutions, which are kept and their final labels;
    the report adds up across runs. A two-party rule whose partner left no verdict anywhere raises at the end,
    as the whole-table version raises before it starts (nothing is written in between)."""

    rule: str
    report: ConsensusReport = field(init=False)
    _partner_seen: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.report = ConsensusReport(self.rule)
        if self.rule != "none":
            decide(self.rule, {})  # an unknown rule fails here, with the usual message

    def apply(self, b: Solutions, labels: np.ndarray, decided: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept per solution, final labels per step)."""
        r = self.report
        if self.rule == "none":
            n, kept = b.count, int(decided.sum())
            r.solutions += n
            r.kept += kept
            if n - kept:
                r.dropped["mc undecided"] = r.dropped.get("mc undecided", 0) + n - kept
            return decided, labels
        chosen, agreed, mc = self.decisions(b, labels, decided)
        keep = chosen & (mc != NO_OPINION)
        relabel = keep & (agreed != mc)
        fe = np.where(relabel, agreed, 0)[b.sol]
        final = np.where(relabel[b.sol], (fe == -1) | (b.pos < fe), labels)
        return keep, final

    def decisions(self, b: Solutions, labels: np.ndarray, decided: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rule's decision on each solution of ``b`` as arrays: (keep, the agreed first error, MC's opinion),
        opinions as ``NO_OPINION`` where undecided; counted in the report. A decision can keep a solution MC left
        undecided (``majority`` of the other verifiers): the pair filter takes such a solution's agreed first
        error, the step exports leave it out (``apply``). ``consensus.decide`` per solution, column-wise for
        ``none`` and the two-party rules (a Decision per solution was a fifth of a pair export's CPU)."""
        partner = _PARTNER.get(self.rule)
        mc = mc_opinions(b, labels, decided)
        r = self.report
        has_mc = mc != NO_OPINION
        if self.rule == "majority":
            keep, agreed, enough = majority_arrays(b.steps, b.per_solution("solution_id"), mc)
            r.solutions += b.count
            r.kept += int(keep.sum())
            r.relabelled += int((keep & (agreed != mc)).sum())  # MC outvoted, or undecided and others agree
            for mask, reason in ((~enough, "too few opinions"), (enough & ~keep, "no majority")):
                if n := int(mask.sum()):
                    r.dropped[reason] = r.dropped.get(reason, 0) + n
            return keep, agreed, mc
        if partner is None:  # `none`: MC alone decides
            keep, why = has_mc, [(~has_mc, "mc undecided")]
        else:
            ids, has, opinions = verifier_opinions(b.steps, partner)
            self._partner_seen = self._partner_seen or bool(has.any())
            # Each solution's opinion, by id (as `verdict_opinions`' dict is read); none where it has no verdicts.
            at = pc.index_in(b.per_solution("solution_id"), value_set=pa.array(ids, pa.string()))
            found = np.asarray(at.is_valid().to_numpy(zero_copy_only=False), bool)
            theirs = np.where(found, opinions[np.asarray(pc.fill_null(at, 0).to_numpy(zero_copy_only=False), np.int64)]
                              if len(ids) else NO_OPINION, NO_OPINION)
            has_theirs = theirs != NO_OPINION
            keep = has_mc & has_theirs & (mc == theirs)
            why = [(~has_mc, "mc undecided"), (has_mc & ~has_theirs, f"{partner} undecided"),
                   (has_mc & has_theirs & (mc != theirs), "disagree")]
        r.solutions += b.count
        r.kept += int(keep.sum())  # the agreed first error is MC's: nothing relabelled
        for mask, reason in why:
            if n := int(mask.sum()):
                r.dropped[reason] = r.dropped.get(reason, 0) + n
        return keep, np.where(keep, mc, NO_OPINION), mc

    def finish(self) -> ConsensusReport:
        if self.rule in _PARTNER and self.report.solutions and not self._partner_seen:
            _require(self.rule, {})
        return self.report


# --- output helpers ----------------------------------------------------------------------------------


def list_array(offsets: np.ndarray, values: pa.Array, type_: pa.DataType | None = None) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=type_)


def kept_steps(b: Solutions, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the kept solutions' steps and their list offsets."""
    lengths = b.lengths()[keep]
    return np.flatnonzero(keep[b.sol]), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class ProblemLookup:
    """problem_id → row of the problems table (the last row wins, as ``ReleaseData.problems``' dict does)."""

    def __init__(self, problems: pa.Table) -> None:
        n = problems.num_rows
        self.table = problems.take(pa.array(np.arange(n - 1, -1, -1))) if n else problems
        self._ids = self.table.column("problem_id").combine_chunks()
        self._columns: dict[str, pa.Array] = {}
        self._json: dict[str, pa.Array] = {}
        self._order: np.ndarray | None = None  # the ids' sort order, made on first use (`_index_in`)
        self._sorted: pa.Array = self._ids

    def rows(self, problem_ids: pa.Array, solution_ids: pa.Array) -> pa.Array:
        """Index into ``self.table`` per solution; a problem_id missing from the table raises, naming the
        first such solution."""
        idx = self.find(problem_ids)
        if idx.null_count:
            j = int(np.flatnonzero(~np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), bool))[0])
            pid, sid = problem_ids[j].as_py(), solution_ids[j].as_py()
            raise StorageError(f"steps[solution_id={sid}]: problem_id {pid!r} is not in the release's problems table.",
                               field="problem_id", value=pid)
        return idx

    def find(self, problem_ids: pa.Array) -> pa.Array:
        """Index into ``self.table`` per id, null where an id is not in the table."""
        return self._index_in(problem_ids)

    def _index_in(self, problem_ids: pa.Array) -> pa.Array:
        """``pc.index_in(problem_ids, value_set=self._ids)``, hashing only the ids between the smallest and the
        largest asked for. ``index_in`` builds a hash set of its whole value set on every call, and a batch of
        solutions (sorted by problem_id) asks for a narrow range: so the ids are sorted once and each call
        looks among that range's ids only (at 1M steps and 50,000 problems: 17 sets of 50,000 ids were 11 %
        of the prm800k exporter's time)."""
        ids = self._ids
        if not len(problem_ids) or problem_ids.null_count or ids.null_count or len(ids) < 4096:
            return pc.index_in(problem_ids, value_set=ids)
        if self._order is None:
            # Stable, so among repeated ids the first (here: the last row of the table) comes first, and
            # `index_in` returns the first match in its value set, as over the whole table.
            self._order = pc.sort_indices(ids).to_numpy()
            self._sorted = ids.take(pa.array(self._order))
        bounds = pc.min_max(problem_ids)
        lo = _bisect(self._sorted, bounds["min"].as_py(), left=True)
        hi = _bisect(self._sorted, bounds["max"].as_py(), left=False)
        local = pc.index_in(problem_ids, value_set=self._sorted.slice(lo, hi - lo))
        found = np.asarray(local.is_valid().to_numpy(zero_copy_only=False), bool)
        rows = self._order[lo + np.asarray(pc.fill_null(local, 0).to_numpy(zero_copy_only=False), np.int64)]
        return pa.array(rows.astype(np.int32), mask=~found) if not found.all() else pa.array(rows.astype(np.int32))

    def column(self, name: str, idx: pa.Array) -> pa.Array:
        if name not in self._columns:  # combined once: the table read from several files comes in chunks
            self._columns[name] = self.table.column(name).combine_chunks()
        return self._columns[name].take(idx)

    def json_column(self, name: str, idx: pa.Array) -> pa.Array:
        """``json_strings(self.column(name, idx))``, escaping each problem's text once for the whole export
        rather than once per solution that refers to it (the column's JSON is kept, like the table)."""
        if name not in self._json:
            self._json[name] = json_strings(self.table.column(name))
        return self._json[name].take(idx)

    def dicts(self, problem_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """problem_id → problem row as a dict, for these ids only (missing ones are left out): what a batch of
        per-row records needs, without turning the whole problems table into Python objects."""
        ids = pa.array(list(dict.fromkeys(problem_ids)), pa.string())
        rows = self.table.take(pc.drop_null(pc.index_in(ids, value_set=self._ids))).to_pylist()
        return {r["problem_id"]: r for r in rows}


def _bisect(values: pa.Array, key: str, *, left: bool) -> int:
    """Where ``key`` goes in sorted string ``values`` (``bisect_left`` / ``bisect_right``). Python compares
    strings by code point, which for UTF-8 is Arrow's byte order."""
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        v = values[mid].as_py()
        if v < key or (not left and v == key):
            lo = mid + 1
        else:
            hi = mid
    return lo


_JSON_NAMED = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"), ("\f", "\\f"))
_JSON_OTHER = [chr(c) for c in range(32) if chr(c) not in "\n\r\t\b\f"]


def string_offsets(values: pa.Array) -> np.ndarray:
    """A string array's ``len + 1`` value offsets into its data buffer (a view, no copy)."""
    buf = values.buffers()[1]
    if buf is None:  # an empty array may come without buffers
        return np.zeros(1, np.int32)
    return np.frombuffer(buf, np.int32)[values.offset: values.offset + len(values) + 1]


_SCAN_BLOCK = 1 << 16


def _needs_escape(values: pa.Array) -> np.ndarray:
    """Per row: whether the string holds a byte JSON escapes (a control character, ``"`` or ``\\``). Three
    comparisons over the data buffer in 64 KiB blocks (the temporaries stay small and are reused, not fresh
    pages per batch; a byte-table lookup was 7× slower, a regex per row slower still). UTF-8 continuation
    bytes are ≥ 0x80, so a hit is the character itself."""
    mask = np.zeros(len(values), bool)
    data = values.buffers()[2] if len(values) else None
    if data is None:
        return mask
    off = string_offsets(values)
    b = np.frombuffer(data, np.uint8)[off[0]: off[-1]]
    for start in range(0, len(b), _SCAN_BLOCK):
        block = b[start: start + _SCAN_BLOCK]
        hits = np.flatnonzero((block < 0x20) | (block == 0x22) | (block == 0x5C))
        if len(hits):
            # The row holding byte h is the last one starting at or before it (an empty row starts there
            # too but also ends there, so `side="right"` passes it).
            mask[np.searchsorted(off, hits + (start + off[0]), side="right") - 1] = True
    return mask


def json_escaped(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each string's body as ``json.dumps(s, ensure_ascii=False)`` writes it, without the quotes (``\\``, ``"``
    and control characters escaped); nulls stay null. Only rows that need escaping are rewritten, so
    usually the array comes back as it was (no copy)."""
    values = values.cast(pa.string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    needs = _needs_escape(values)
    if not needs.any():
        return values
    sub = values.take(pa.array(np.flatnonzero(needs)))
    for raw, esc in _JSON_NAMED:
        sub = pc.replace_substring(sub, raw, esc)
    if pc.any(pc.match_substring_regex(sub, r"[\x00-\x1f]")).as_py():
        for ch in _JSON_OTHER:
            sub = pc.replace_substring(sub, ch, f"\\u{ord(ch):04x}")
    return pc.replace_with_mask(values, pa.array(needs), sub)


def json_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each string as ``json.dumps(s, ensure_ascii=False)`` writes it (quoted, ``\\``, ``"`` and control
    characters escaped); nulls as ``null``."""
    quoted = pc.binary_join_element_wise('"', json_escaped(values), '"', "")
    return pc.fill_null(quoted, "null")


def join_pieces(parts: Sequence[pa.Array], pieces: np.ndarray, bounds: np.ndarray) -> pa.Array:
    """String ``i`` of the result is ``source[pieces[bounds[i]]] + … + source[pieces[bounds[i + 1] - 1]]``, where
    ``source`` is the strings of ``parts`` one after another (a null counts as its bytes: empty, as Arrow
    writes them).

    One ``take`` copies every piece into one data buffer, in order, which is then already the result's data:
    only the offsets at ``bounds`` are picked out. So text assembled from many pieces (constants and columns
    placed side by side in ``parts``) costs one pass over the output bytes, where nested ``binary_join``s
    copy it once per level. Output beyond 2 GiB per call overflows the int32 offsets (as any ``string``
    array would); callers work in batches far below that."""
    offsets = [string_offsets(a) for a in parts]
    sizes = [int(o[-1] - o[0]) if len(o) else 0 for o in offsets]
    n_source, n_bytes = sum(len(a) for a in parts), sum(sizes)
    starts = np.cumsum([0, *sizes])
    source_offsets = np.empty(n_source + 2, np.int32)
    at = 0
    for o, start in zip(offsets, starts):
        source_offsets[at: at + len(o) - 1] = o[:-1] - o[0] + start
        at += len(o) - 1
    source_offsets[n_source] = n_bytes
    # Arrow's take reserves the output's data as the source's mean string length times the number of
    # pieces, then grows it by reallocation (each growth copies into fresh memory, and on this machine the
    # first touch of memory is dear: it was half of the take's time). One extra source string, never taken,
    # brings the mean up to the pieces' mean, so the output is allocated once at its size. Its bytes are
    # only reserved, never written (pages never touched cost nothing); if Arrow sizes differently one day,
    # only the speed changes, not the result.
    # Bytes of the output: each source string's length times how often it is taken.
    out_bytes = int(np.bincount(pieces, minlength=n_source) @ np.diff(source_offsets[: n_source + 1])) if len(pieces) else 0
    filler = max(0, -(-(out_bytes + 64) * (n_source + 1) // len(pieces)) - n_bytes) if len(pieces) else 0
    source_offsets[n_source + 1] = n_bytes + filler
    data = np.empty(n_bytes + filler, np.uint8)
    for a, o, start, size in zip(parts, offsets, starts, sizes):
        if size:
            data[start: start + size] = np.frombuffer(a.buffers()[2], np.uint8)[o[0]: o[-1]]
    source = pa.StringArray.from_buffers(n_source + 1, pa.py_buffer(source_offsets), pa.py_buffer(data))
    flat = source.take(pa.array(pieces))
    ends = string_offsets(flat)[bounds]
    flat_data = flat.buffers()[2] if len(flat) else None
    return pa.StringArray.from_buffers(len(bounds) - 1, pa.py_buffer(np.ascontiguousarray(ends, np.int32)),
                                       flat_data if flat_data is not None else pa.py_buffer(b""))
