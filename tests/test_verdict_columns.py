"""``verdict_columns``: the verdicts cut to verifier and status, whether read cut from Parquet or projected from
the whole column, hold the same lists, nulls and field values as the whole column read by field name (what
``consensus._opinion_table`` reads), sliced or chunked."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.exports.verdict_columns import OPINION_FIELDS, OPINIONS, opinion_leaves, opinions
from storage.schema import VERDICT

NAME = st.one_of(st.none(), st.sampled_from(["mc", "judge", "check", "é"]))
ENTRY = st.one_of(st.none(), st.fixed_dictionaries({
    "verifier": NAME, "version": st.one_of(st.none(), st.just("1")),
    "status": st.one_of(st.none(), st.sampled_from(["valid", "invalid", "error", "timeout", "none", "odd"])),
    "score": st.one_of(st.none(), st.floats(0, 1)), "detail": st.one_of(st.none(), st.text(max_size=3))}))
LISTS = st.lists(st.one_of(st.none(), st.lists(ENTRY, max_size=3)), max_size=12)


def _read_by_name(col: pa.ChunkedArray) -> list:
    """Per row: None, or per entry (verifier, status) as ``pc.struct_field`` reads them (a null entry: Nones)."""
    out = []
    for a in col.chunks:
        flat = pc.list_flatten(a)
        fields = [pc.struct_field(flat, f).to_pylist() for f in OPINION_FIELDS]
        parents = pc.list_parent_indices(a).to_pylist()
        rows: list = [None if not v else [] for v in a.is_valid().to_pylist()]
        for p, *vals in zip(parents, *fields):
            rows[p].append(tuple(vals))
        out += [None if not valid else r for r, valid in zip(rows, a.is_valid().to_pylist())]
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=LISTS, cut=st.integers(0, 12), start=st.integers(0, 3))
def test_opinions_keep_what_the_rules_read(tmp_path, rows, cut, start):
    whole = pa.array(rows, pa.list_(VERDICT))
    sliced = whole.slice(min(start, len(whole)))
    col = pa.chunked_array([sliced.slice(0, cut), sliced.slice(cut)], sliced.type)
    got = opinions(col)
    assert got.type == OPINIONS
    assert _read_by_name(got) == _read_by_name(col)
    # Read cut from a file: the same, once brought to OPINIONS.
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"verdicts": whole}), path)
    pf = pq.ParquetFile(path)
    leaves = opinion_leaves(pf.schema)
    assert leaves is not None
    read = opinions(pf.read(columns=leaves).column("verdicts"))
    assert read.type == OPINIONS
    assert _read_by_name(read) == _read_by_name(pa.chunked_array([whole]))


def test_all_null_and_missing_columns():
    assert opinions(pa.chunked_array([pa.nulls(3, pa.list_(VERDICT))])).to_pylist() == [None] * 3
    assert opinion_leaves(_schema_without_status()) is None


def _schema_without_status() -> pq.ParquetSchema:
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table({"verdicts": pa.array([[{"verifier": "j"}]], pa.list_(pa.struct([("verifier", pa.string())])))}), buf)
    return pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema


def test_pair_consensus_over_files_with_and_without_verdicts(tmp_path):
    """Shard files of one release, one written before steps had verdicts (no such column), one with judge
    verdicts: the consensus pass reads the one cut and the other as nulls, both as ``OPINIONS``, and the export
    is the whole-table exporter's."""
    import importlib.util

    import export_reference as ref
    from conftest import REPO
    from storage.exports import EXPORTERS, parse_options
    from storage.exports.base import load_release
    from storage.objectstore import open_store
    from storage.release import commit_release, stage_shard

    spec = importlib.util.spec_from_file_location("storage_throughput", REPO / "benchmarks" / "storage_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tables = bench.make_tables(2000, judged=True)
    store = open_store(str(tmp_path / "root"))
    pids = tables["problems"].column("problem_id")
    for j, keep in enumerate((pc.less(pids, "p00000050"), pc.greater_equal(pids, "p00000050"))):
        part = {name: t.filter(pc.is_in(t.column("problem_id"), value_set=pids.filter(keep))) for name, t in tables.items()}
        if j == 1:
            part["steps"] = part["steps"].drop_columns(["verdicts"])
        stage_shard(store, "demo", "b", f"s{j}", part)
    m = commit_release(store, "demo", build_key="b", shard_keys=["s0", "s1"], manifest_fields={}, card="# d\n")
    for fmt in ("trl-dpo", "step-dpo"):
        opts = parse_options(fmt, {"consensus": "mc-and-judge"})
        got = EXPORTERS[fmt].fn(load_release(store, "demo", m["version"]), opts)
        want = getattr(ref, fmt.replace("-", "_") + "_export")(load_release(store, "demo", m["version"]), opts)
        assert got.table.num_rows and got.table.equals(want.table) and got.stats == want.stats
