"""A DuckDB catalog of the releases under one store root: tables of datasets/versions/builds and one SQL
view per (dataset, version, table), plus ``<dataset>_<table>`` views on the latest version.

View names: a dataset name may contain ``-`` and ``.``, which are not plain SQL identifiers, so each
character outside ``[A-Za-z0-9_]`` becomes ``_`` (``my-set@v2`` → ``my_set_v2_steps``). Two dataset
names that sanitise to the same view name are refused at sync.

The connection is opened for the duration of one call, because several processes (flows, the CLI) share
the file and DuckDB lets only one process hold it for writing; a locked file is retried briefly.
Credentials for ``s3://`` roots go into a TEMPORARY DuckDB secret built from the environment on each
connection, so they never reach the catalog file.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb

from storage.errors import StorageError
from storage.objectstore import DEFAULT_ROOT, ObjectStore
from storage.release import list_datasets, list_versions, read_manifest

__all__ = ["Catalog", "default_catalog_path", "view_name"]

_LOCK_WAIT_S = 10.0
_DDL = """
CREATE TABLE IF NOT EXISTS catalog_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS datasets (name VARCHAR PRIMARY KEY, latest_version INTEGER);
CREATE TABLE IF NOT EXISTS versions (dataset VARCHAR, version INTEGER, content_hash VARCHAR,
    created_at VARCHAR, row_counts JSON, manifest JSON, PRIMARY KEY (dataset, version));
CREATE TABLE IF NOT EXISTS builds (dataset VARCHAR, version INTEGER, config JSON, seed BIGINT,
    code_version VARCHAR, policy VARCHAR, timings JSON, PRIMARY KEY (dataset, version));
"""


def default_catalog_path(root: str | None = None) -> str:
    """``<local root>/catalog.duckdb``; for an ``s3://`` root a local ``./stepforge-catalog.duckdb``."""
    root = root or DEFAULT_ROOT
    if root.startswith("s3://"):
        return "./stepforge-catalog.duckdb"
    return str(Path(root) / "catalog.duckdb")


def view_name(dataset: str, table: str, version: int | None = None) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", dataset)
    return f"{base}_v{version}_{table}" if version is not None else f"{base}_{table}"


def _q(text: str) -> str:
    """A SQL string literal (DDL such as CREATE VIEW / CREATE SECRET takes no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _load_httpfs(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("LOAD httpfs")
        return
    except duckdb.Error:
        pass
    # Offline: `LOAD httpfs` looks only in ~/.duckdb; the pip package ships the binary in site-packages.
    try:
        import duckdb_extension_httpfs as pkg
    except ImportError as exc:
        raise StorageError("DuckDB httpfs is not available: pip install duckdb-extension-httpfs==<duckdb version>.") from exc
    base = Path(pkg.__file__).parent / "extensions"
    found = sorted(base.glob(f"v{duckdb.__version__}/**/httpfs.duckdb_extension")) or sorted(base.glob("**/httpfs.duckdb_extension"))
    if not found:
        raise StorageError(f"no httpfs.duckdb_extension under {base}; reinstall duckdb-extension-httpfs.")
    con.execute(f"LOAD {_q(str(found[0]))}")


def _create_s3_secret(con: duckdb.DuckDBPyConnection, root: str, endpoint_url: str | None, region: str | None) -> None:
    env = os.environ
    opts = ["TYPE s3", f"REGION {_q(region or env.get('AWS_REGION') or env.get('AWS_DEFAULT_REGION') or 'us-east-1')}"]
    if env.get("AWS_ACCESS_KEY_ID"):
        opts += [f"KEY_ID {_q(env['AWS_ACCESS_KEY_ID'])}", f"SECRET {_q(env.get('AWS_SECRET_ACCESS_KEY', ''))}"]
    if env.get("AWS_SESSION_TOKEN"):
        opts.append(f"SESSION_TOKEN {_q(env['AWS_SESSION_TOKEN'])}")
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        # S3-compatible servers (MinIO, moto) expect path-style URLs.
        opts += [f"ENDPOINT {_q(host.rstrip('/'))}", "URL_STYLE 'path'", f"USE_SSL {'true' if scheme == 'https' else 'false'}"]
    bucket = root[len("s3://") :].split("/", 1)[0]
    opts.append(f"SCOPE {_q('s3://' + bucket)}")
    con.execute(f"CREATE OR REPLACE TEMPORARY SECRET stepforge_s3 ({', '.join(opts)})")


class Catalog:
    """The DuckDB file at ``path``; ``sync`` (re)registers a store's releases, ``sql`` queries them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def __repr__(self) -> str:
        return f"Catalog({self.path!r})"

    @classmethod
    def for_store(cls, store: ObjectStore, path: str | None = None) -> "Catalog":
        """The catalog of `store`: `path` if given, else the default beside the data."""
        return cls(path or default_catalog_path(store.root))

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
            con.execute(_DDL)
            meta = dict(con.execute("SELECT key, value FROM catalog_meta").fetchall())
            root = store.root if store is not None else meta.get("root", "")
            if root.startswith("s3://"):
                _load_httpfs(con)
                _create_s3_secret(
                    con,
                    root,
                    getattr(store, "endpoint_url", None) if store is not None else meta.get("endpoint_url") or None,
                    getattr(store, "region", None) if store is not None else meta.get("region") or None,
                )
            yield con
        finally:
            con.close()

    def sync(self, store: ObjectStore) -> dict[str, list[int]]:
        """Register every visible version of every dataset in ``store``; returns {dataset: versions}."""
        found: dict[str, list[int]] = {d: list_versions(store, d) for d in list_datasets(store)}
        seen: dict[str, str] = {}
        for ds in found:
            other = seen.setdefault(view_name(ds, ""), ds)
            if other != ds:
                raise StorageError(f"datasets {other!r} and {ds!r} map to the same SQL view names; rename one.", field="dataset", value=ds)
        manifests = {(ds, v): read_manifest(store, ds, v) for ds, vs in found.items() for v in vs}
        with self._connect(store) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'").fetchall():
                    con.execute(f'DROP VIEW IF EXISTS "{name}"')
                for table in ("datasets", "versions", "builds", "catalog_meta"):
                    con.execute(f"DELETE FROM {table}")
                meta = {"root": store.root, "endpoint_url": getattr(store, "endpoint_url", None) or "", "region": getattr(store, "region", None) or ""}
                con.executemany("INSERT INTO catalog_meta VALUES (?, ?)", list(meta.items()))
                for ds, versions in found.items():
                    con.execute("INSERT INTO datasets VALUES (?, ?)", [ds, versions[-1]])
                    for v in versions:
                        self._register_version(con, store, manifests[(ds, v)], latest=v == versions[-1])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return found

    @staticmethod
    def _register_version(con: duckdb.DuckDBPyConnection, store: ObjectStore, m: dict[str, Any], *, latest: bool) -> None:
        ds, v = m["dataset"], int(m["version"])
        con.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
            [ds, v, m.get("content_hash"), m.get("created_at"), json.dumps(m.get("row_counts", {})), json.dumps(m, default=str)],
        )
        policy = m.get("policy")
        con.execute(
            "INSERT INTO builds VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                ds,
                v,
                json.dumps(m.get("config"), default=str),
                m.get("seed") if isinstance(m.get("seed"), int) else None,
                None if m.get("code_version") is None else str(m.get("code_version")),
                policy if isinstance(policy, str) or policy is None else json.dumps(policy, default=str),
                json.dumps(m.get("timings"), default=str),
            ],
        )
        tables = sorted({rel.split("/", 1)[0] for rel in m.get("files", {}) if rel.endswith(".parquet")})
        for table in tables:
            source = f"SELECT * FROM read_parquet({_q(store.uri(f'{ds}/v{v}/{table}') + '/*.parquet')})"
            con.execute(f'CREATE VIEW "{view_name(ds, table, v)}" AS {source}')
            if latest:
                con.execute(f'CREATE VIEW "{view_name(ds, table)}" AS {source}')

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
