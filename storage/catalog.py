"""A DuckDB catalog of the releases under one store root: tables of datasets/versions/builds and one SQL
view per (dataset, version, table), ``<dataset>_<table>`` views on the latest version, and
``<dataset>_all_<table>`` views over every version (with a ``version`` column) for cross-version queries.

View names: a dataset name may contain ``-`` and ``.``, which are not plain SQL identifiers, so each
character outside ``[A-Za-z0-9_]`` becomes ``_`` (``my-set@v2`` → ``my_set_v2_steps``). A new build whose
name would share views with a dataset already on the root is refused before any work
(``storage.names``); on a root that already holds such a pair, sync keeps the first and reports the other.

Views read exactly the Parquet files each manifest lists (never a glob), so a stray file in a release
folder cannot add rows (it is reported). A damaged release (unreadable manifest, files missing or
resized) is left out of the catalog with one warning naming `stepforge datasets verify`; the rest syncs
as usual.

The connection is opened for the duration of one call, because several processes (flows, the CLI) share
the file and DuckDB lets only one process hold it for writing; a locked file is retried briefly.
Credentials for ``s3://`` roots go into a TEMPORARY DuckDB secret built on each connection from the
store's resolved credentials, so they never reach the catalog file. The catalog is derived data: ``sync``
rebuilds it from the manifests, which stay the source of truth.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb

from storage.errors import StorageError
from storage.objectstore import DEFAULT_ROOT, ObjectStore, StorageConfig, is_remote_root, open_store
from storage.objectstore import sql_literal as _q
from storage.release import BrokenRelease, scan_root

__all__ = ["Catalog", "default_catalog_path", "view_name", "duckdb_connect_store"]

_LOCK_WAIT_S = 10.0
CATALOG_SCHEMA = "2"
_TABLES = ("catalog_meta", "datasets", "versions", "builds")
_DDL = """
CREATE TABLE IF NOT EXISTS catalog_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS datasets (name VARCHAR PRIMARY KEY, latest_version INTEGER, versions INTEGER);
CREATE TABLE IF NOT EXISTS versions (dataset VARCHAR, version INTEGER, parent_version INTEGER,
    content_hash VARCHAR, created_at VARCHAR, schema_version VARCHAR, row_counts JSON, location VARCHAR,
    manifest JSON, PRIMARY KEY (dataset, version));
CREATE TABLE IF NOT EXISTS builds (dataset VARCHAR, version INTEGER, build_key VARCHAR, config JSON,
    seed BIGINT, code_version VARCHAR, policy VARCHAR, algorithm VARCHAR, timings JSON, row_counts JSON,
    stats JSON, PRIMARY KEY (dataset, version));
"""


def _unreadable_files(exc: duckdb.Error) -> bool:
    """A release's files themselves are broken (not Parquet, or gone), as opposed to a store that failed to
    answer, which must fail the sync loudly rather than drop views."""
    if isinstance(exc, duckdb.InvalidInputException):
        return True
    return (isinstance(exc, duckdb.IOException) and not isinstance(exc, duckdb.HTTPException)
            and "No files found" in str(exc))


class CatalogWarning(UserWarning):
    """A release's files could not be read while syncing the catalog; its views were left out."""


def default_catalog_path(root: str | None = None) -> str:
    """``<local root>/catalog.duckdb``; for an ``s3://`` root a local ``./stepforge-catalog.duckdb``."""
    root = root or DEFAULT_ROOT
    if is_remote_root(root):
        return "./stepforge-catalog.duckdb"
    return str(Path(root) / "catalog.duckdb")


def view_name(dataset: str, table: str, version: int | None = None) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", dataset)
    return f"{base}_v{version}_{table}" if version is not None else f"{base}_{table}"


def duckdb_connect_store(store: ObjectStore, path: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read ``store``'s Parquet files (httpfs + a TEMPORARY secret for S3)."""
    con = duckdb.connect(path)
    store.configure_duckdb(con)
    return con


class Catalog:
    """The DuckDB file at ``path``; ``sync`` (re)registers a store's releases, ``sql`` queries them."""

    def __init__(self, path: str | os.PathLike[str], store: ObjectStore | None = None) -> None:
        self.path = str(path)
        self._store = store  # credentials for s3:// views; without it, the env/profile chain of the root
        self.skipped: list[tuple[str, int, str]] = []  # (dataset, version, table) left without views by `sync`
        self.broken: list[BrokenRelease] = []  # damaged releases left out by `sync`
        self.collisions: list[tuple[str, str]] = []  # (dataset left out, dataset whose view names it shares)

    def __repr__(self) -> str:
        return f"Catalog({self.path!r})"

    @classmethod
    def for_store(cls, store: ObjectStore, path: str | None = None) -> "Catalog":
        """The catalog of `store`: `path` if given, else the default beside the data."""
        return cls(path or default_catalog_path(store.root), store)

    @contextmanager
    def _connect(self, store: ObjectStore | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _LOCK_WAIT_S
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(self.path)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise StorageError(f"cannot open catalog {self.path}: {exc}", field="catalog", value=self.path) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            meta = self._meta(con)
            if store is None:
                store = self._store
            if store is None and is_remote_root(meta.get("root", "")):
                # A catalog opened by path alone: same root, credentials from the env chain.
                store = open_store(StorageConfig(root=meta["root"], endpoint_url=meta.get("endpoint_url") or None,
                                                 region=meta.get("region") or None))
            if store is not None:
                store.configure_duckdb(con)
            yield con
        finally:
            con.close()

    @staticmethod
    def _meta(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'catalog_meta' AND schema_name = 'main'").fetchone()
        if not exists or not exists[0]:
            return {}
        return dict(con.execute("SELECT key, value FROM catalog_meta").fetchall())

    def sync(self, store: ObjectStore) -> dict[str, list[int]]:
        """Register every intact visible version of every dataset in ``store``; returns {dataset: versions}.

        Damaged releases are left out (``self.broken``), tables whose files DuckDB cannot read get no views
        (``self.skipped``), and a dataset whose view names collide with another's is left out
        (``self.collisions``); each case warns once (``CatalogWarning``) and never fails the sync.
        """
        scan = scan_root(store)
        self.broken = list(scan.broken)
        for b in self.broken:
            warnings.warn(f"catalog: {b.line()}", CatalogWarning, stacklevel=2)
        manifests = dict(scan.manifests)
        # Dataset names may contain '-' and '.', and `x` v1 and `x_v1` latest would both give `x_v1_steps`;
        # DuckDB also matches names case-insensitively. New names that collide are refused before a build
        # starts; a root that already holds such a pair keeps the first dataset's views and reports the other.
        owners: dict[str, str] = {}
        self.collisions = []
        for ds in sorted({ds for ds, _ in manifests}):
            mine = {name.lower() for (d, v), m in manifests.items() if d == ds for table in self._tables(m)
                    for name in (view_name(d, table, v), view_name(d, table), view_name(d, f"all_{table}"))}
            clash = sorted({owners[n] for n in mine if n in owners})
            if clash:
                self.collisions.append((ds, clash[0]))
                warnings.warn(f"catalog: datasets {clash[0]!r} and {ds!r} map to the same SQL view names; {ds!r} "
                              "has no views. Rebuild one of them under another name.", CatalogWarning, stacklevel=2)
                manifests = {k: m for k, m in manifests.items() if k[0] != ds}
                continue
            owners.update(dict.fromkeys(mine, ds))
        found = {ds: sorted(v for d, v in manifests if d == ds) for ds in sorted({d for d, _ in manifests})}
        with self._connect(store) as con:
            # A view binds its files' schema when it is created, so one unreadable file (a corrupted part of
            # some old version, same size as committed) would abort the whole sync, and with it every later
            # build's commit. Such tables are found first and left without views, with a warning naming
            # them; `stepforge datasets verify` says what is wrong with the files.
            self.skipped.clear()
            for (ds, v), m in manifests.items():
                for table in self._tables(m):
                    try:
                        con.execute(f"DESCRIBE SELECT * FROM {self._source(store, m, table)}")
                    except duckdb.Error as exc:
                        if not _unreadable_files(exc):
                            raise  # the store did not answer (HTTP, credentials): not a broken release
                        self.skipped.append((ds, v, table))
                        warnings.warn(f"catalog: no views for {ds}@v{v} {table}: its files cannot be read "
                                      f"({str(exc).splitlines()[0]}); run `stepforge datasets verify {ds}@v{v}`",
                                      CatalogWarning, stacklevel=2)
            con.execute("BEGIN TRANSACTION")
            try:
                for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'").fetchall():
                    con.execute(f'DROP VIEW IF EXISTS "{name}"')
                # The catalog is derived from the manifests, so an older layout is simply rebuilt.
                for table in _TABLES:
                    con.execute(f"DROP TABLE IF EXISTS {table}")
                con.execute(_DDL)
                where = store.settings()
                meta = {
                    "schema": CATALOG_SCHEMA,
                    "root": where.root,
                    "endpoint_url": where.endpoint_url or "",
                    "region": where.region or "",
                }
                con.executemany("INSERT INTO catalog_meta VALUES (?, ?)", list(meta.items()))
                for ds, versions in found.items():
                    con.execute("INSERT INTO datasets VALUES (?, ?, ?)", [ds, versions[-1], len(versions)])
                    skip = {(v, t) for d, v, t in self.skipped if d == ds}
                    for v in versions:
                        self._register_version(con, store, manifests[(ds, v)], latest=v == versions[-1], skip=skip)
                    self._register_all_versions(con, store, ds, [manifests[(ds, v)] for v in versions], skip=skip)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return found

    @staticmethod
    def _tables(m: dict[str, Any]) -> list[str]:
        return sorted({rel.split("/", 1)[0] for rel in m.get("files", {}) if rel.endswith(".parquet")})

    @staticmethod
    def _source(store: ObjectStore, m: dict[str, Any], table: str) -> str:
        """``read_parquet([...])`` over exactly the files the manifest lists for ``table``."""
        ds, v = m["dataset"], int(m["version"])
        uris = [store.uri(f"{ds}/v{v}/{rel}") for rel in sorted(m["files"])
                if rel.startswith(f"{table}/") and rel.endswith(".parquet")]
        return "read_parquet([" + ", ".join(_q(u) for u in uris) + "])"

    @classmethod
    def _register_version(cls, con: duckdb.DuckDBPyConnection, store: ObjectStore, m: dict[str, Any], *, latest: bool,
                          skip: set[tuple[int, str]] = frozenset()) -> None:  # type: ignore[assignment]
        ds, v = m["dataset"], int(m["version"])
        con.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ds,
                v,
                m.get("parent_version"),
                m.get("content_hash"),
                m.get("created_at"),
                m.get("schema_version"),
                json.dumps(m.get("row_counts", {})),
                store.uri(f"{ds}/v{v}"),
                json.dumps(m, default=str),
            ],
        )
        policy = m.get("policy")
        con.execute(
            "INSERT INTO builds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ds,
                v,
                m.get("build_key"),
                json.dumps(m.get("config"), default=str),
                m.get("seed") if isinstance(m.get("seed"), int) else None,
                None if m.get("code_version") is None else str(m.get("code_version")),
                policy if isinstance(policy, str) or policy is None else json.dumps(policy, default=str),
                None if m.get("algorithm") is None else str(m.get("algorithm")),
                json.dumps(m.get("timings"), default=str),
                json.dumps(m.get("row_counts", {})),
                json.dumps(m.get("stats"), default=str),
            ],
        )
        for table in cls._tables(m):
            if (v, table) in skip:
                continue
            source = f"SELECT * FROM {cls._source(store, m, table)}"
            con.execute(f'CREATE VIEW "{view_name(ds, table, v)}" AS {source}')
            if latest:
                con.execute(f'CREATE VIEW "{view_name(ds, table)}" AS {source}')

    @classmethod
    def _register_all_versions(cls, con: duckdb.DuckDBPyConnection, store: ObjectStore, ds: str, manifests: list[dict[str, Any]],
                               skip: set[tuple[int, str]] = frozenset()) -> None:  # type: ignore[assignment]
        tables = sorted({t for m in manifests for t in cls._tables(m)})
        for table in tables:
            # BY NAME: a column added by a later schema version is NULL in older versions, not an error.
            parts = [
                f"SELECT {int(m['version'])} AS version, * FROM {cls._source(store, m, table)}"
                for m in manifests
                if table in cls._tables(m) and (int(m["version"]), table) not in skip
            ]
            if not parts:
                continue
            con.execute(f'CREATE VIEW "{view_name(ds, f"all_{table}")}" AS ' + " UNION ALL BY NAME ".join(parts))

    def sql(self, query: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ``query``; returns (column names, rows)."""
        with self._connect() as con:
            try:
                cur = con.execute(query, params or [])
                rows = cur.fetchall() if cur.description else []
                cols = [d[0] for d in cur.description] if cur.description else []
            except duckdb.Error as exc:
                raise StorageError(f"query failed: {str(exc).splitlines()[0]}", field="query", value=query) from exc
        return cols, rows
