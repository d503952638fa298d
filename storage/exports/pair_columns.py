"""A batch of pairs as the columns the pair exports' records are made of (``trl-dpo``, ``step-dpo``), built with
Arrow compute instead of a Python dict per pair.

A pair record is a few renderings of its own strings (its prefix steps and its next steps in the step format)
next to things that depend on its problem only (the prompt's head, the dataset, the answer). The former are
string kernels over the batch; the latter are computed once per distinct problem of the batch with the very
``PromptLayout`` calls the per-pair code makes, then spread to the pairs by index. Same strings, so the same
bytes: the per-pair records (``records`` of each export) stay as the path for what this one does not
reproduce exactly, and ``PairColumns.of`` says when that is (see its doc).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.exports.stream import ProblemLookup
from storage.render import PromptLayout

__all__ = ["PairColumns"]


class PairColumns:
    """Column-wise pieces of one batch of pairs (rows in the batch's order)."""

    def __init__(self, t: pa.Table, renderer: PromptLayout, lookup: ProblemLookup, problem_rows: pa.Array,
                 lengths: np.ndarray, flat: pa.Array) -> None:
        self.t = t
        self._r = renderer
        self._lookup = lookup
        self._lengths = lengths  # prefix steps per pair (a null prefix has none, as `row["prefix_steps"] or []`)
        self._flat = flat  # every pair's prefix steps, one after another
        rows = np.asarray(problem_rows.to_numpy(zero_copy_only=False), np.int64)
        # The distinct problems in the order their first pair comes (so the first error a problem's rendering
        # raises is the one the per-pair path raises first), and each pair's problem among them.
        distinct, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        order = np.argsort(first)
        self._problems = distinct[order]
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        self._inverse = pa.array(rank[inverse.reshape(-1)])
        self._head_cache: pa.Array | None = None

    @property
    def _heads(self) -> pa.Array:
        """The step format's heads ("Step {i}: "), one per position a step of this batch takes (prefix steps, then
        the next step); made on first use, where the per-pair path first renders a step."""
        if self._head_cache is None:
            n = int(self._lengths.max(initial=0)) + 1
            self._head_cache = pa.array([self._r.step_format.head(i) for i in range(n)], pa.string())
        return self._head_cache

    @classmethod
    def of(cls, t: pa.Table, renderer: PromptLayout, lookup: ProblemLookup) -> "PairColumns | None":
        """The batch's columns, or None where the per-pair records must be built instead: a problem_id that is
        null or not in the problems table (that path raises, naming the first such pair), a null step text (the
        step format would write ``None``), a step label ``str.format`` refuses, or an empty batch."""
        pids = t.column("problem_id").combine_chunks()
        if not t.num_rows or pids.null_count:
            return None
        try:
            renderer.step_format.head(0)
        except Exception:  # a label `str.format` refuses: the per-pair path raises it where it first renders a step
            return None
        problem_rows = lookup.find(pids)
        if problem_rows.null_count:
            return None
        for name in ("chosen", "rejected"):
            if t.column(name).null_count:
                return None
        prefix = t.column("prefix_steps").combine_chunks()
        lengths = np.asarray(pc.fill_null(pc.list_value_length(prefix), 0).to_numpy(zero_copy_only=False), np.int64)
        flat = pc.list_flatten(prefix)
        if flat.null_count or len(flat) != int(lengths.sum()):
            return None
        return cls(t, renderer, lookup, problem_rows, lengths, flat)

    def per_problem(self, fn: Callable[..., Any], columns: list[str], type_: pa.DataType = pa.string()) -> pa.Array:
        """``fn(*the problem's columns)`` for each distinct problem of the batch, spread to its pairs."""
        idx = pa.array(self._problems)
        values = zip(*(self._lookup.column(c, idx).to_pylist() for c in columns))
        return pa.array([fn(*v) for v in values], type_).take(self._inverse)

    def prompt_heads(self, head: Callable[[str], str | None]) -> pa.Array:
        """``head(question)`` per pair, where ``head`` is ``renderer.prompt_head`` or a rendering equal to it
        wherever ``renderer.plain_head()`` applies: there the pieces are joined for the whole column (a Python
        call per problem was a fifth of the records' CPU), a null question excepted (written ``None``)."""
        pieces = self._r.plain_head()
        if pieces is not None and None in pieces:
            questions = self._lookup.column("question", pa.array(self._problems))
            if not questions.null_count:
                parts = [questions if p is None else pa.scalar(p, pa.string()) for p in pieces]
                return pc.binary_join_element_wise(*parts, "").take(self._inverse)
        return self.per_problem(head, ["question"])

    def prefix_text(self) -> pa.Array:
        """Each pair's prefix steps rendered (``PromptLayout.steps``): head, text and separator per step."""
        starts = np.r_[0, np.cumsum(self._lengths)]
        pos = np.arange(len(self._flat)) - np.repeat(starts[:-1], self._lengths)
        sep = self._r.step_format.separator
        steps = pc.binary_join_element_wise(self._heads.take(pa.array(pos)), self._flat, pa.scalar(sep), "")
        return pc.binary_join(pa.ListArray.from_arrays(pa.array(starts, pa.int64()).cast(pa.int32()), steps), "")

    def next_step(self, name: str) -> pa.Array:
        """Column ``name`` (``chosen``/``rejected``) rendered as the step after the prefix (``PromptLayout.step``)."""
        return self.next_steps(self.t.column(name).combine_chunks(), np.arange(self.t.num_rows))

    def next_steps(self, texts: pa.Array, rows: np.ndarray) -> pa.Array:
        """``texts[i]`` rendered as the step after pair ``rows[i]``'s prefix (several steps may follow one pair's
        prefix: rstar-ppm's positive and negative steps)."""
        heads = self._heads.take(pa.array(self._lengths[rows]))
        return pc.binary_join_element_wise(heads, texts, pa.scalar(self._r.step_format.separator), "")

    def stored_or(self, name: str, fallback: pa.Array) -> pa.Array:
        """Column ``name`` where it holds a non-empty string, else ``fallback`` (``row[name] or fallback``)."""
        stored = self.t.column(name).combine_chunks()
        present = pc.fill_null(pc.not_equal(stored, ""), False)
        return pc.if_else(present, stored, fallback)
