"""rstar-ppm's rows for a run of whole problems, built with NumPy and Arrow compute instead of a dict per prefix.

The per-prefix records (``rstar_ppm._records``) merge every pair of a (problem, prefix) into two dicts (a chosen
step's best value, a rejected step's worst), drop a step on both sides, keep the ``max_per_side`` extremes
(ties by text) and sort the prefixes. Column-wise: every string becomes its rank among the batch's distinct
strings (Arrow orders strings by their UTF-8 bytes, which is the order of code points, Python's ``str``
order), so grouping and sorting are integer sorts; the prompt and the steps are rendered by ``PairColumns``
with the same ``PromptLayout`` calls. ``ppm_columns`` returns None wherever it would not reproduce the
records exactly (see its doc); the caller then builds the records.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.exports.pair_columns import PairColumns
from storage.exports.stream import ProblemLookup
from storage.render import PromptLayout

__all__ = ["ppm_columns"]


def ppm_columns(t: pa.Table, kinds: list[str] | None, max_per_side: int, renderer: PromptLayout,
                lookup: ProblemLookup) -> dict[str, pa.Array] | None:
    """The rstar-ppm rows (``prompt, pos, neg, pos_count, neg_count``, sorted by problem and prefix) of the pairs
    ``t`` (problem_id, prefix_steps, chosen, rejected, chosen_value, rejected_value, kind), or None where the
    records must be built instead: a null problem_id, step text or prefix step (Python compares None apart),
    a NaN value (``max`` with NaN depends on the order), or what ``PairColumns.of`` or the prompt head refuse."""
    if kinds is not None:
        t = t.filter(pc.fill_null(pc.is_in(t.column("kind"), value_set=pa.array(kinds, pa.string())), False))
    pids, chosen, rejected = (t.column(c).combine_chunks() for c in ("problem_id", "chosen", "rejected"))
    prefix = t.column("prefix_steps").combine_chunks()
    lengths = np.asarray(pc.fill_null(pc.list_value_length(prefix), 0).to_numpy(zero_copy_only=False), np.int64)
    flat = pc.list_flatten(prefix)
    if pids.null_count or chosen.null_count or rejected.null_count or flat.null_count or len(flat) != lengths.sum():
        return None
    # A missing value counts as the side's extreme (chosen 1.0, rejected 0.0), as the records read it.
    cv = np.asarray(pc.fill_null(t.column("chosen_value"), 1.0).to_numpy(), np.float64)
    rv = np.asarray(pc.fill_null(t.column("rejected_value"), 0.0).to_numpy(), np.float64)
    if np.isnan(cv).any() or np.isnan(rv).any():
        return None
    n = t.num_rows
    texts, codes = _ranks([flat, chosen, rejected])
    step_codes, cho, rej = np.split(codes, [len(flat), len(flat) + n])
    group, first = _groups(_ranks([pids])[1], lengths, step_codes)
    width = len(texts)
    # A step preferred in one pair and dispreferred in another is ambiguous at this prefix: out of both sides.
    both = np.intersect1d(group * width + cho, group * width + rej)
    pos_g, pos_c = _extremes(group, cho, cv, width, max_per_side, np.maximum, both)
    neg_g, neg_c = _extremes(group, rej, rv, width, max_per_side, np.minimum, both)
    pos_count = np.bincount(pos_g, minlength=len(first))
    neg_count = np.bincount(neg_g, minlength=len(first))
    ok = (pos_count > 0) & (neg_count > 0)
    if not ok.any():
        return {"prompt": pa.array([], pa.string())}
    cols = PairColumns.of(t.take(pa.array(first[ok])), renderer, lookup)
    heads = None if cols is None else cols.prompt_heads(renderer.prompt_head)
    if cols is None or heads is None or heads.null_count:
        return None
    row = np.cumsum(ok) - 1  # a kept group's row in the output

    def steps(g: np.ndarray, c: np.ndarray, count: np.ndarray) -> pa.Array:
        at = ok[g]
        rendered = cols.next_steps(texts.take(pa.array(c[at])), row[g[at]])
        offsets = np.r_[0, np.cumsum(count[ok])].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), rendered)

    return {"prompt": pc.binary_join_element_wise(heads, cols.prefix_text(), ""),
            "pos": steps(pos_g, pos_c, pos_count), "neg": steps(neg_g, neg_c, neg_count),
            "pos_count": pa.array(pos_count[ok].astype(np.int32)), "neg_count": pa.array(neg_count[ok].astype(np.int32))}


def _ranks(values: list[pa.Array]) -> tuple[pa.Array, np.ndarray]:
    """The distinct strings of ``values`` (concatenated) in sorted order, and each string's rank among them."""
    joined = pa.concat_arrays([v.cast(pa.string()) for v in values]) if len(values) > 1 else values[0]
    enc = pc.dictionary_encode(joined)
    order = np.asarray(pc.sort_indices(enc.dictionary).to_numpy(), np.int64)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    indices = np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)
    return enc.dictionary.take(pa.array(order)), rank[indices]


def _groups(pid: np.ndarray, lengths: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, its (problem, prefix) group, numbered in the order the records sort them (problem, then the
    prefix as a tuple: a shorter prefix before its extensions); and one pair of each group. Sorted one level at
    a time from the last (a stable sort per key, as ``np.lexsort`` but without an n × depth matrix)."""
    n = len(pid)
    starts = np.cumsum(lengths) - lengths
    order = np.arange(n)
    levels = int(lengths.max(initial=0))

    def level_key(level: int) -> np.ndarray:
        key = np.full(n, -1, np.int64)  # no step at this level: before any step, as a tuple ends before another
        has = lengths > level
        key[has] = codes[starts[has] + level]
        return key

    for level in range(levels - 1, -1, -1):
        key = level_key(level)
        order = order[np.argsort(key[order], kind="stable")]
    order = order[np.argsort(pid[order], kind="stable")]
    new = np.zeros(n, bool)
    if n:
        new[0] = True
        new[1:] = pid[order][1:] != pid[order][:-1]
        for level in range(levels):
            key = level_key(level)[order]
            new[1:] |= key[1:] != key[:-1]
    group = np.empty(n, np.int64)
    group[order] = np.cumsum(new) - 1
    return group, order[new]


def _extremes(group: np.ndarray, code: np.ndarray, value: np.ndarray, width: int, keep: int, best: np.ufunc,
              ambiguous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One side of each group: its distinct steps (``group * width + code`` not in ``ambiguous``) by their
    ``best`` value over the group's pairs (``np.maximum`` for the chosen side, ``np.minimum`` for the
    rejected), best first and ties by text, cut to ``keep`` per group. Returns (group, step code), sorted by
    group."""
    key = group * width + code
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    k = k[starts]
    v = best.reduceat(value[order], starts) if len(starts) else np.zeros(0, np.float64)
    mine = ~np.isin(k, ambiguous)
    k, v = k[mine], v[mine]
    g, c = k // width, k % width
    # Best first: the highest value for the chosen side, the lowest for the rejected.
    by = np.lexsort((c, -v if best is np.maximum else v, g))
    g, c, v = g[by], c[by], v[by]
    run = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
    within = np.arange(len(g)) - np.repeat(run, np.diff(np.r_[run, len(g)]))
    cut = within < keep
    return g[cut], c[cut]
