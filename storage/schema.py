"""The data contract: Arrow schemas of a release's tables and the content-hash IDs.

Every table is written sorted by its key columns so that equal inputs give byte-equal Parquet files;
no wall-clock value ever enters a data table (times live in the manifest).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa

SCHEMA_VERSION = "1.0"

TABLES = ("problems", "nodes", "steps", "pairs")


# What `json.dumps(part, sort_keys=True, ensure_ascii=False, default=str)` uses, built once: `json.dumps` with
# any non-default option builds a new encoder per call, a third of content_id's cost (node ids, per step).
_ENCODE = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str).encode
# What that encoder's `encode` returns for a str (with ensure_ascii=False), without the Python call around it:
# node ids are strings and None, once per step.
_ENCODE_STR = json.encoder.encode_basestring


def content_id(*parts: Any) -> str:
    """A stable 16-byte hex ID from the parts (``None`` and strings distinguished, order matters)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        encoded = (_ENCODE_STR(part) if type(part) is str else "null" if part is None else _ENCODE(part)).encode()
        h.update(len(encoded).to_bytes(8, "little") + encoded)  # one update: the same bytes, the same digest
    return h.hexdigest()


def problem_id(source: str, question: str) -> str:
    return content_id("problem", source, question)


def node_id(parent_id: str | None, step_text: str) -> str:
    return content_id("node", parent_id, step_text)


def pair_id(prefix_node_id: str, chosen: str, rejected: str) -> str:
    return content_id("pair", prefix_node_id, chosen, rejected)


VERDICT = pa.struct(
    [
        ("verifier", pa.string()),
        ("version", pa.string()),
        ("status", pa.string()),  # valid | invalid | error | timeout | none (nothing to check)
        ("score", pa.float64()),
        ("detail", pa.string()),
    ]
)

PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("header", pa.string()),
        ("formal_statement", pa.string()),
        ("metadata", pa.string()),  # JSON text: portable to every reader
    ]
)

NODES = pa.schema(
    [
        ("node_id", pa.string()),
        ("problem_id", pa.string()),
        ("parent_id", pa.string()),
        ("depth", pa.int32()),
        ("step_text", pa.string()),
        ("is_terminal", pa.bool_()),
        ("final_answer", pa.string()),
        ("rollouts", pa.int32()),
        ("rollouts_correct", pa.int32()),
        ("visits", pa.int32()),
        ("value_sum", pa.float64()),
        ("prior_logprob", pa.float64()),
        ("verdicts", pa.list_(VERDICT)),
        ("algorithm", pa.string()),
        ("policy", pa.string()),
        ("round", pa.int32()),
    ]
)

STEPS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("solution_id", pa.string()),
        ("step_index", pa.int32()),
        ("step_text", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("mc_k", pa.int32()),
        ("mc_c", pa.int32()),
        ("mc_value", pa.float64()),
        ("q_value", pa.float64()),
        ("advantage", pa.float64()),
        ("first_error_index", pa.int32()),
        ("judge_label", pa.bool_()),
        ("formal_label", pa.bool_()),
        ("consensus", pa.bool_()),
        ("label_source", pa.string()),
        # Every step-level verifier's verdict on this step (arith-check, code-check, judge, ...): raw evidence
        # that consensus rules read at export; empty when no step verifier ran.
        ("verdicts", pa.list_(VERDICT)),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("problem_id", pa.string()),
        ("prompt", pa.string()),
        ("prefix_steps", pa.list_(pa.string())),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_value", pa.float64()),
        ("rejected_value", pa.float64()),
        ("margin", pa.float64()),
        ("full_chosen", pa.string()),
        ("full_rejected", pa.string()),
        ("answer", pa.string()),
        ("kind", pa.string()),  # first_error | sibling | ranked | formal (Lean-verified)
        ("group_id", pa.string()),
        ("rank", pa.int32()),
    ]
)

# The MUSTARD-style generation flow's records (`stepforge mustard`, flows/mustard.py): one row per seed whose
# formal proof Lean accepted, with the four texts and every attempt's verdict. Not one of `TABLES`: only
# releases of that flow hold it (a build's release has none).
MUSTARD = pa.schema(
    [
        ("record_id", pa.string()),  # h(concept id, problem, formal proof)
        ("seed_id", pa.string()),  # <concept id>#<sample index>: unique in a release
        ("problem_id", pa.string()),  # the row of `problems` holding the problem (source `mustard`)
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("level", pa.string()),
        ("problem", pa.string()),
        ("informal_proof", pa.string()),
        ("formal_proof", pa.string()),  # the Lean file Lean accepted, as the author wrote it
        ("header", pa.string()),  # its imports, as checked
        ("formal_statement", pa.string()),  # the theorem up to `:= by`
        ("revisions", pa.int32()),  # revisions it took (attempts - 1)
        ("verdicts", pa.list_(VERDICT)),  # one per attempt, in order; the last is `valid`
        ("attempts", pa.list_(pa.string())),  # each attempt's Lean file, in order; the last is formal_proof
        ("feedback", pa.list_(pa.string())),  # Lean's messages shown to the author after each rejected attempt
        ("author", pa.string()),  # the author model's policy id
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"problems": PROBLEMS, "nodes": NODES, "steps": STEPS, "pairs": PAIRS,
                                 "mustard": MUSTARD}

# Rows are sorted by these before writing, so files do not depend on scheduling order.
SORT_KEYS: dict[str, list[str]] = {
    "problems": ["problem_id"],
    "nodes": ["problem_id", "node_id"],
    "steps": ["problem_id", "solution_id", "step_index"],
    "pairs": ["problem_id", "pair_id"],
    "mustard": ["seed_id"],
}

UNIQUE_KEYS: dict[str, list[str]] = {
    "problems": ["problem_id"],
    "nodes": ["node_id"],
    "steps": ["solution_id", "step_index"],
    "pairs": ["pair_id"],
    "mustard": ["seed_id"],
}


def to_table(name: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a table of the contract's schema, deduplicated by key and sorted."""
    schema = SCHEMAS[name]
    unique: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(tuple(row[k] for k in UNIQUE_KEYS[name]), row)
    table = pa.Table.from_pylist(list(unique.values()), schema=schema)
    if table.num_rows:
        table = table.sort_by([(k, "ascending") for k in SORT_KEYS[name]])
    return table


class RowBatches:
    """Rows arriving in groups (a shard's trees, as each finishes) made into Arrow a batch at a time, so the
    conversion happens while other work waits (converting a whole shard's rows after its last answer was most
    of its tail) and costs one call per `batch` rows, not per group. `table` gives exactly `to_table` of all the
    groups' rows in their order."""

    def __init__(self, name: str, batch: int = 256) -> None:
        self.name = name
        self._batch = batch
        self._pending: list[dict[str, Any]] = []
        self._parts: list[pa.Table] = []
        self._keys: set[Any] = set()
        self._repeated = False  # a key in two groups: then which row stays depends on the groups' order

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        # A group's own repeats go first-wins here, as in `to_table`; a key of an earlier group sends `table` back
        # to `to_table` of all the rows in order (which row stays depends on that order).
        keys = UNIQUE_KEYS[self.name]
        unique: dict[Any, dict[str, Any]] = {}
        if len(keys) == 1:
            (key,) = keys
            for row in rows:
                unique.setdefault(row[key], row)
        else:
            for row in rows:
                unique.setdefault(tuple(row[k] for k in keys), row)
        if not self._keys.isdisjoint(unique):
            self._repeated = True
        self._keys.update(unique)
        self._pending += unique.values()
        if len(self._pending) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._parts.append(pa.Table.from_pylist(self._pending, schema=SCHEMAS[self.name]))
            self._pending = []

    def table(self, rows_in_order: Callable[[], Iterable[dict[str, Any]]]) -> pa.Table:
        """The contract table; `rows_in_order` gives every row in group order, read only where a key repeats
        across groups (then `to_table` of those rows decides, as it always did)."""
        if self._repeated:
            return to_table(self.name, rows_in_order())
        self._flush()
        if not self._parts:
            return to_table(self.name, [])
        table = pa.concat_tables(self._parts) if len(self._parts) > 1 else self._parts[0]
        # `to_table`'s order, one contiguous chunk per column like `to_table`'s: the same Parquet bytes.
        return table.sort_by([(k, "ascending") for k in SORT_KEYS[self.name]]).combine_chunks()


def normalise(name: str, table: pa.Table) -> pa.Table:
    """Cast, deduplicate and sort a table (e.g. several shards concatenated) into contract form."""
    return to_table(name, table.cast(SCHEMAS[name]).to_pylist())
