"""`stepforge datasets ...`: list, inspect, query, verify and clean up releases.

User errors (bad names, missing versions, failing SQL) print one line and exit 2; a failed verify exits 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from storage.catalog import Catalog, default_catalog_path
from storage.errors import StepforgeError
from storage.objectstore import DEFAULT_ROOT, ObjectStore, open_store
from storage.release import gc, latest_version, list_datasets, list_versions, parse_ref, read_manifest, verify_release

__all__ = ["datasets_app"]

datasets_app = typer.Typer(help="Inspect, query, verify and clean up dataset releases.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@dataclass
class _Ctx:
    root: str
    catalog: str | None

    def store(self) -> ObjectStore:
        return open_store(self.root)

    def open_catalog(self) -> Catalog:
        return Catalog(self.catalog or default_catalog_path(self.root))


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _obj(ctx: typer.Context) -> _Ctx:
    obj = ctx.find_object(_Ctx)
    return obj if obj is not None else _Ctx(os.environ.get("STEPFORGE_ROOT") or DEFAULT_ROOT, None)


@datasets_app.callback()
def _main(
    ctx: typer.Context,
    root: Optional[str] = typer.Option(None, "--root", help="Store root: a folder or s3://bucket/prefix. Default: $STEPFORGE_ROOT or ./stepforge-data."),
    catalog: Optional[str] = typer.Option(None, "--catalog", help="DuckDB catalog file. Default: <root>/catalog.duckdb (./stepforge-catalog.duckdb for s3://)."),
) -> None:
    ctx.obj = _Ctx(root or os.environ.get("STEPFORGE_ROOT") or DEFAULT_ROOT, catalog)


def _resolve(store: ObjectStore, ref: str) -> tuple[str, int]:
    name, version = parse_ref(ref)
    if version is None:
        version = latest_version(store, name)
        if version is None:
            _fail(f"dataset {name!r} has no committed version under {store.root}; see `stepforge datasets list`.")
    return name, version


@datasets_app.command("list")
def list_cmd(ctx: typer.Context) -> None:
    """Datasets with their versions, row counts and content hashes."""
    try:
        store = _obj(ctx).store()
        table = Table("dataset", "version", "rows", "content hash", "created")
        for ds in list_datasets(store):
            for v in list_versions(store, ds):
                m = read_manifest(store, ds, v)
                rows = ", ".join(f"{t}={n}" for t, n in m.get("row_counts", {}).items())
                table.add_row(ds, f"v{v}", rows, str(m.get("content_hash", ""))[:12], str(m.get("created_at", "")))
    except StepforgeError as exc:
        _fail(str(exc))
    if not table.rows:
        console.print(f"no datasets under {store.root}")
        return
    console.print(table)


def _label_balance(store: ObjectStore, ds: str, version: int, manifest: dict[str, Any]) -> tuple[int, int]:
    """(steps with mc_c > 0, steps with an MC estimate) across the version's steps files."""
    positive = total = 0
    for rel in sorted(manifest["files"]):
        if rel.startswith("steps/") and rel.endswith(".parquet"):
            fs, path = store.filesystem_path(f"{ds}/v{version}/{rel}")
            col = pq.read_table(path, columns=["mc_c"], filesystem=fs)["mc_c"]
            total += len(col) - col.null_count
            positive += int(pc.sum(pc.greater(col, 0)).as_py() or 0)
    return positive, total


@datasets_app.command("show")
def show_cmd(ctx: typer.Context, ref: str = typer.Argument(..., metavar="NAME[@vN]")) -> None:
    """Manifest summary of a version (latest when no @vN): rows, label balance, config, seed, files."""
    try:
        store = _obj(ctx).store()
        ds, v = _resolve(store, ref)
        m = read_manifest(store, ds, v)
        positive, total = _label_balance(store, ds, v, m)
    except StepforgeError as exc:
        _fail(str(exc))
    console.print(f"[bold]{ds}@v{v}[/bold]  parent: {m.get('parent_version')}  created: {m.get('created_at')}")
    console.print(f"content hash: {m.get('content_hash')}  schema: {m.get('schema_version')}")
    console.print("rows: " + ", ".join(f"{t}={n}" for t, n in m.get("row_counts", {}).items()))
    if total:
        console.print(f"label balance (steps with mc_c > 0): {positive}/{total} = {positive / total:.3f}")
    else:
        console.print("label balance: no steps")
    for field in ("seed", "code_version", "policy"):
        if field in m:
            console.print(f"{field}: {m[field]}")
    if "config" in m:
        console.print("config: " + json.dumps(m["config"], sort_keys=True, default=str), highlight=False, soft_wrap=True)
    files = Table("file", "rows", "bytes", "sha256")
    for rel, f in sorted(m["files"].items()):
        files.add_row(rel, "" if f.get("rows") is None else str(f["rows"]), str(f["bytes"]), f["sha256"][:12])
    console.print(files)


@datasets_app.command("sql")
def sql_cmd(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="SQL over views like <dataset>_steps or <dataset>_v1_steps."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as a JSON list of objects."),
) -> None:
    """Run SQL against the catalog (synced with the store first)."""
    try:
        obj = _obj(ctx)
        catalog = obj.open_catalog()
        catalog.sync(obj.store())
        cols, rows = catalog.sql(query)
    except StepforgeError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str, ensure_ascii=False))
        return
    table = Table(*cols)
    for r in rows:
        table.add_row(*("" if x is None else str(x) for x in r))
    console.print(table)


@datasets_app.command("verify")
def verify_cmd(ctx: typer.Context, ref: str = typer.Argument(..., metavar="NAME[@vN]")) -> None:
    """Re-hash every file of a version against its manifest; exit 1 on any difference."""
    try:
        store = _obj(ctx).store()
        ds, v = _resolve(store, ref)
        problems = verify_release(store, ds, v)
    except StepforgeError as exc:
        _fail(str(exc))
    if problems:
        for p in problems:
            err_console.print(f"{ds}@v{v}: {p}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{ds}@v{v}: OK")


@datasets_app.command("gc")
def gc_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="Only this dataset (default: all)."),
    older_than: float = typer.Option(3600, "--older-than", min=0, help="Keep leftovers younger than this many seconds (0: remove all)."),
) -> None:
    """Remove unfinished versions, stale claims and staging folders."""
    try:
        removed = gc(_obj(ctx).store(), name, older_than_s=older_than)
    except StepforgeError as exc:
        _fail(str(exc))
    for key in removed:
        console.print(f"removed {key}", highlight=False)
    console.print(f"{len(removed)} removed")
