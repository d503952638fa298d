"""The steps' ``verdicts`` column cut to what the consensus rules read (each verdict's ``verifier`` and
``status``, see ``consensus._opinion_table``), for the passes that read verdicts only to decide.

A verdict is a struct of five fields; the rules read two. Asking the Parquet reader for those two leaves
decodes about half as much (the judge's ``version``, ``score`` and ``detail`` are never touched: at 1M
judged steps 0.08 → 0.045 CPU s for the column). The reader names the cut column's list item ``item``,
not ``element``, and a table in memory or a file without verdicts has the whole type, so every batch is
brought to one type, ``OPINIONS``, by field name.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["OPINION_FIELDS", "OPINIONS", "opinion_leaves", "opinions"]

OPINION_FIELDS = ("verifier", "status")
OPINIONS = pa.list_(pa.struct([(f, pa.string()) for f in OPINION_FIELDS]))


def opinion_leaves(schema: pq.ParquetSchema, column: str = "verdicts") -> list[str] | None:
    """The Parquet paths of ``column``'s verdict fields the rules read (``verdicts.list.element.verifier``…,
    however the writer named the list levels), or None where the file does not hold them as a list of
    structs with those fields (then the whole column is read)."""
    paths = {}
    for i in range(len(schema)):
        parts = schema.column(i).path.split(".")
        if parts[0] == column and len(parts) == 4 and parts[-1] in OPINION_FIELDS:
            paths[parts[-1]] = schema.column(i).path
    return [paths[f] for f in OPINION_FIELDS] if len(paths) == len(OPINION_FIELDS) else None


def opinions(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """``col`` (verdicts, whole or cut) as ``OPINIONS``: the same lists, nulls and entries, each entry with its
    verifier and status only (a null entry's fields read as null, as ``pc.struct_field`` reads them)."""
    if col.type == OPINIONS:
        return col
    chunks = []
    for a in col.chunks:
        if pa.types.is_null(a.type) or a.null_count == len(a):
            chunks.append(pa.nulls(len(a), OPINIONS))
            continue
        # Offsets from 0 over the entries this (maybe sliced) chunk spans: `from_arrays` takes no mask beside
        # sliced offsets.
        offsets = a.offsets
        first, last = offsets[0].as_py(), offsets[len(offsets) - 1].as_py()
        items = a.values.slice(first, last - first)
        fields = [pc.struct_field(items, f) for f in OPINION_FIELDS]
        entries = pa.StructArray.from_arrays(fields, names=list(OPINION_FIELDS))
        mask = a.is_null() if a.null_count else None
        chunks.append(pa.ListArray.from_arrays(pc.subtract(offsets, first), entries, type=OPINIONS, mask=mask))
    return pa.chunked_array(chunks, OPINIONS)
