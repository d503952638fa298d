"""``stepforge datasets diff A B``: what changed between two versions (of one dataset, or of two datasets
built from the same problems), computed by DuckDB directly over
the two releases' Parquet files (local or S3), so it needs no catalog sync.

Steps are identified by (solution_id, step_index) and problems by problem_id, both content hashes, so
"added"/"removed" mean different content, not different row positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from storage.catalog import _q, duckdb_connect_store
from storage.errors import StorageError
from storage.objectstore import ObjectStore
from storage.release import read_release

__all__ = ["DiffRow", "diff_versions"]


@dataclass(frozen=True)
class DiffRow:
    metric: str
    a: Any
    b: Any
    delta: Any


def _files(store: ObjectStore, dataset: str, version: int, manifest: dict[str, Any], table: str) -> str:
    uris = [store.uri(f"{dataset}/v{version}/{rel}") for rel in sorted(manifest["files"])
            if rel.startswith(f"{table}/") and rel.endswith(".parquet")]
    return "read_parquet([" + ", ".join(_q(u) for u in uris) + "])"


def _delta(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    d = b - a
    return round(d, 6) if isinstance(d, float) else d


def diff_versions(store: ObjectStore, dataset: str, version_a: int, version_b: int, *,
                  dataset_b: str | None = None) -> list[DiffRow]:
    """`dataset@version_a` against `dataset_b@version_b` (default: the same dataset). Two datasets built
    from the same problems compare like two versions (ids are content hashes), e.g. two algorithms."""
    dataset_b = dataset_b or dataset
    ma, mb = read_release(store, dataset, version_a), read_release(store, dataset_b, version_b)
    con = duckdb_connect_store(store)
    try:
        return _diff(con, store, (dataset, version_a, ma), (dataset_b, version_b, mb))
    except duckdb.Error as exc:
        raise StorageError(f"{dataset}@v{version_a} or {dataset_b}@v{version_b} cannot be read: "
                           f"{str(exc).splitlines()[0]}; check them with `stepforge datasets verify`.",
                           field="ref") from exc
    finally:
        con.close()


def _diff(con: duckdb.DuckDBPyConnection, store: ObjectStore, side_a: tuple[str, int, dict[str, Any]],
          side_b: tuple[str, int, dict[str, Any]]) -> list[DiffRow]:
    (dataset, version_a, ma), (dataset_b, version_b, mb) = side_a, side_b
    for side, ds, v, m in (("a", dataset, version_a, ma), ("b", dataset_b, version_b, mb)):
        for table in ("problems", "steps", "pairs"):
            con.execute(f"CREATE VIEW {side}_{table} AS SELECT * FROM {_files(store, ds, v, m, table)}")
    one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    rows: list[DiffRow] = []
    for table in ("problems", "steps", "pairs"):
        a, b = one(f"SELECT count(*) FROM a_{table}"), one(f"SELECT count(*) FROM b_{table}")
        rows.append(DiffRow(f"{table} rows", a, b, b - a))
    added = one("SELECT count(*) FROM (SELECT problem_id FROM b_problems EXCEPT SELECT problem_id FROM a_problems)")
    removed = one("SELECT count(*) FROM (SELECT problem_id FROM a_problems EXCEPT SELECT problem_id FROM b_problems)")
    rows += [DiffRow("problems added", None, added, None), DiffRow("problems removed", removed, None, None)]
    key = "solution_id, step_index"
    added = one(f"SELECT count(*) FROM (SELECT {key} FROM b_steps EXCEPT SELECT {key} FROM a_steps)")
    removed = one(f"SELECT count(*) FROM (SELECT {key} FROM a_steps EXCEPT SELECT {key} FROM b_steps)")
    rows += [DiffRow("steps added", None, added, None), DiffRow("steps removed", removed, None, None)]
    # Label balance at the default hard label (c > 0) among steps that have an MC estimate.
    bal = "SELECT avg(CASE WHEN mc_c > 0 THEN 1.0 ELSE 0.0 END) FROM {t}_steps WHERE mc_k > 0"
    a, b = one(bal.format(t="a")), one(bal.format(t="b"))
    rows.append(DiffRow("label balance (c > 0)", _r(a), _r(b), _delta(_r(a), _r(b))))
    a, b = one("SELECT avg(mc_value) FROM a_steps"), one("SELECT avg(mc_value) FROM b_steps")
    rows.append(DiffRow("mean MC value", _r(a), _r(b), _delta(_r(a), _r(b))))
    kinds = dict(con.execute("SELECT kind, count(*) FROM a_pairs GROUP BY kind").fetchall())
    kinds_b = dict(con.execute("SELECT kind, count(*) FROM b_pairs GROUP BY kind").fetchall())
    for kind in sorted(set(kinds) | set(kinds_b) | {"first_error", "sibling", "ranked"}):
        a, b = kinds.get(kind, 0), kinds_b.get(kind, 0)
        rows.append(DiffRow(f"pairs: {kind}", a, b, b - a))
    rows.append(DiffRow("content hash", ma.get("content_hash", "")[:12], mb.get("content_hash", "")[:12],
                        "same" if ma.get("content_hash") == mb.get("content_hash") else "changed"))
    return rows


def _r(x: Any) -> Any:
    return None if x is None else round(float(x), 6)
