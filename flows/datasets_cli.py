"""`stepforge datasets ...`: list, inspect, query, diff, verify, clean up, export and publish releases.

User errors (bad names, missing versions, failing SQL) print one line and exit 2; a failed verify exits 1.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, NoReturn, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

import yaml

from flows.errors import print_error
from storage.catalog import Catalog, CatalogWarning, default_catalog_path
from storage.errors import ConfigError, StepforgeError
from storage.exports import EXPORTERS
from storage.objectstore import DEFAULT_ROOT, ObjectStore, S3Credentials, StorageConfig
from storage.release import check_release, gc, latest_version, parse_ref, read_release, scan_root

__all__ = ["datasets_app"]

datasets_app = typer.Typer(help="Inspect, query, verify and clean up dataset releases.", no_args_is_help=True)
# Markup off: everything printed holds user text (names, paths, SQL, manifest fields) that must print as is.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


@dataclass
class _Ctx:
    storage: StorageConfig
    _credentials: S3Credentials | None = field(default=None, repr=False)

    @property
    def root(self) -> str:
        return self.storage.root

    def store(self, root: str | None = None) -> ObjectStore:
        """The store at ``root`` (default: ``--root``) with this invocation's storage settings and block
        credentials, so an ``s3://`` export target is reached exactly like the source root."""
        from flows.stores import block_credentials, open_root

        target = self.storage if root is None else self.storage.model_copy(update={"root": root})
        if not target.is_remote:
            return open_root(target)
        if self.storage.credentials_block and self._credentials is None:
            self._credentials = block_credentials(self.storage.credentials_block)  # one block read per invocation
        return open_root(target, credentials=self._credentials)

    def open_catalog(self, store: ObjectStore | None = None) -> Catalog:
        return Catalog(self.storage.catalog or default_catalog_path(self.root), store)


def _fail(message: str, code: int = 2) -> NoReturn:
    print_error(err_console, message)  # markup off: the message may hold a user's path or SQL
    raise typer.Exit(code)


def _s3_message(exc: Exception) -> str:
    """One line for an S3/network failure, with what to check (a traceback helps no CLI user here)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, EndpointConnectionError):
        return f"{text}; check --endpoint-url (or $AWS_ENDPOINT_URL) and that the server is reachable."
    if isinstance(exc, NoCredentialsError):
        return f"{text}; set AWS keys, --profile or --credentials-block."
    return f"S3 request failed: {text}"


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn expected failures into the usual one-line ``error: ...`` and exit 2: stepforge's own errors,
    botocore's (endpoint unreachable, access denied, no credentials) and pyarrow's S3 ``OSError``s."""
    try:
        yield
    except StepforgeError as exc:
        _fail(str(exc))
    except (BotoCoreError, ClientError) as exc:
        _fail(_s3_message(exc))
    except Exception as exc:
        # huggingface_hub's HTTP errors (401, 403, 5xx after retries) subclass OSError, so they are told
        # apart first: the first line of their message says what happened.
        if type(exc).__module__.startswith("huggingface_hub"):
            _fail(f"Hub request failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        if isinstance(exc, OSError):
            _fail(" ".join(str(exc).split()))
        if isinstance(exc, pa.ArrowException):  # a Parquet file of the release cannot be read
            _fail(f"a release file cannot be read ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                  "check the release with `stepforge datasets verify NAME@vN`.")
        raise


def _warn(message: str) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"), highlight=False, soft_wrap=True)


@contextmanager
def _catalog_warnings() -> Iterator[None]:
    """A damaged release is reported as one `warning:` line each (not Python's two-line warning format);
    other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CatalogWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, CatalogWarning):
                    _warn(str(w.message).removeprefix("catalog: "))
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _obj(ctx: typer.Context) -> _Ctx:
    obj = ctx.find_object(_Ctx)
    return obj if obj is not None else _Ctx(StorageConfig(root=os.environ.get("STEPFORGE_ROOT") or DEFAULT_ROOT))


@datasets_app.callback()
def _main(
    ctx: typer.Context,
    root: Optional[str] = typer.Option(None, "--root", help="Store root: a folder or s3://bucket/prefix. Default: $STEPFORGE_ROOT or ./stepforge-data."),
    catalog: Optional[str] = typer.Option(None, "--catalog", help="DuckDB catalog file. Default: <root>/catalog.duckdb (./stepforge-catalog.duckdb for s3://)."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (MinIO, R2). Default: $AWS_ENDPOINT_URL."),
    profile: Optional[str] = typer.Option(None, "--profile", help="AWS profile for s3:// roots. Default: boto3's chain ($AWS_PROFILE, env keys, role)."),
    region: Optional[str] = typer.Option(None, "--region", help="S3 region. Default: $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1."),
    credentials_block: Optional[str] = typer.Option(
        None, "--credentials-block",
        help="Prefect block holding S3 keys, e.g. aws-credentials/minio or secret/s3-keys (JSON). Read in memory, never printed."),
) -> None:
    try:
        storage = StorageConfig(root=root or os.environ.get("STEPFORGE_ROOT") or DEFAULT_ROOT, catalog=catalog,
                                endpoint_url=endpoint_url, profile=profile, region=region,
                                credentials_block=credentials_block)
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}")
    ctx.obj = _Ctx(storage)


def _resolve(store: ObjectStore, ref: str) -> tuple[str, int]:
    name, version = parse_ref(ref)
    if version is None:
        version = latest_version(store, name)
        if version is None:
            _fail(f"dataset {name!r} has no committed version under {store.root}; see `stepforge datasets list`.")
    return name, version


@datasets_app.command("list")
def list_cmd(ctx: typer.Context) -> None:
    """Datasets with their versions, row counts and content hashes (damaged releases: one warning each)."""
    with _user_errors():
        store = _obj(ctx).store()
        scan = scan_root(store)
        table = Table("dataset", "version", "rows", "content hash", "created")
        for (ds, v), m in sorted(scan.manifests.items()):
            rows = ", ".join(f"{t}={n}" for t, n in m.get("row_counts", {}).items())
            table.add_row(ds, f"v{v}", rows, str(m.get("content_hash", ""))[:12], str(m.get("created_at", "")))
    for broken in scan.broken:
        _warn(broken.line())
    if not table.rows:
        console.print(f"no datasets under {store.root}", highlight=False)
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
    with _user_errors():
        store = _obj(ctx).store()
        ds, v = _resolve(store, ref)
        m = read_release(store, ds, v)
        positive, total = _label_balance(store, ds, v, m)
    console.print(Text.assemble((f"{ds}@v{v}", "bold"), f"  parent: {m.get('parent_version')}  created: {m.get('created_at')}"))
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
    query: str = typer.Argument(..., help="Any SQL over views <dataset>_v<N>_<table>, <dataset>_<table> (latest), "
                                "<dataset>_all_<table> (every version, with a `version` column) and the tables "
                                "datasets, versions, builds."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as a JSON list of objects."),
) -> None:
    """Run SQL against the catalog (synced with the store first)."""
    with _user_errors():
        obj = _obj(ctx)
        store = obj.store()
        catalog = obj.open_catalog(store)
        with _catalog_warnings():
            catalog.sync(store)
        cols, rows = catalog.sql(query)
    if as_json:
        typer.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str, ensure_ascii=False))
        return
    table = Table(*cols)
    for r in rows:
        table.add_row(*("" if x is None else str(x) for x in r))
    console.print(table)


@datasets_app.command("verify")
def verify_cmd(ctx: typer.Context, ref: str = typer.Argument(..., metavar="NAME[@vN]")) -> None:
    """Check a version against its manifest: the manifest's own digest, every file's presence, size and
    sha256, row counts per file and per table, the content hash; exit 1 on any difference."""
    with _user_errors():
        store = _obj(ctx).store()
        ds, v = _resolve(store, ref)
        check = check_release(store, ds, v)
    for note in check.notes:
        err_console.print(f"{ds}@v{v}: note: {note}", highlight=False, soft_wrap=True)
    if check.problems:
        for p in check.problems:
            err_console.print(f"{ds}@v{v}: {p}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{ds}@v{v}: OK", highlight=False)


@datasets_app.command("gc")
def gc_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="Only this dataset (default: all)."),
    older_than: float = typer.Option(3600, "--older-than", min=0, help="Keep leftovers younger than this many seconds (0: remove all)."),
) -> None:
    """Remove unfinished versions, stale claims and staging folders."""
    with _user_errors():
        removed = gc(_obj(ctx).store(), name, older_than_s=older_than)
    for key in removed:
        console.print(f"removed {key}", highlight=False)
    console.print(f"{len(removed)} removed")


@datasets_app.command("compact-cache")
def compact_cache_cmd(ctx: typer.Context) -> None:
    """Merge the shared rollout cache's segments (<root>/_cache/rollouts/) into one; safe while builds run."""
    from flows.shared_cache import compact

    with _user_errors():
        report = compact(_obj(ctx).store())
    for key, why in report.left.items():
        _warn(f"left in place, not merged: {key}: {why}")
    if report.merged:
        console.print(Text(f"merged {report.read} segments into {report.key} ({report.rows} rollouts); "
                           f"{len(report.merged)} removed"), soft_wrap=True)
    else:
        console.print(Text(f"nothing to compact: {'1 segment' if report.key else 'no segments'} "
                           f"({report.rows} rollouts)"), soft_wrap=True)


def _parse_options(items: list[str], *, prefixed: bool) -> dict[str, dict[str, object]] | dict[str, object]:
    """``key=value`` (or ``format.key=value``) pairs; values are YAML scalars/lists (``0.5``, ``[a, b]``)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"`--option` must look like {'format.key' if prefixed else 'key'}=value, got {item!r}.", field="option", value=item)
        value = yaml.safe_load(raw) if raw else ""
        if prefixed:
            fmt, dot, name = key.partition(".")
            if not dot:
                raise ConfigError(f"`--option` must name its export, e.g. trl-prm.threshold=0.5, got {item!r}.", field="option", value=item)
            out.setdefault(fmt, {})[name] = value
        else:
            out[key] = value
    return out


@datasets_app.command("diff")
def diff_cmd(
    ctx: typer.Context,
    ref_a: str = typer.Argument(..., metavar="NAME@vA"),
    ref_b: str = typer.Argument(..., metavar="NAME@vB"),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON."),
) -> None:
    """Problems/steps added and removed, label balance and mean MC shift, pairs by kind (two versions of
    one dataset, or of two datasets built from the same problems, e.g. two algorithms)."""
    from storage.diff import diff_versions

    with _user_errors():
        store = _obj(ctx).store()
        ds_a, va = _resolve(store, ref_a)
        ds_b, vb = _resolve(store, ref_b)
        rows = diff_versions(store, ds_a, va, vb, dataset_b=ds_b)
    if as_json:
        typer.echo(json.dumps([{"metric": r.metric, "a": r.a, "b": r.b, "delta": r.delta} for r in rows], default=str))
        return
    title = f"{ds_a}: v{va} → v{vb}" if ds_a == ds_b else f"{ds_a}@v{va} → {ds_b}@v{vb}"
    table = Table("metric", f"{ds_a}@v{va}", f"{ds_b}@v{vb}", "delta", title=title)
    for r in rows:
        # Shares and means to 3 decimals (the JSON keeps full precision); delta signed.
        cells = [("" if x is None else f"{x:+.3f}" if (i == 2 and isinstance(x, float)) else
                  f"{x:.3f}" if isinstance(x, float) else str(x)) for i, x in enumerate((r.a, r.b, r.delta))]
        table.add_row(r.metric, *cells)
    console.print(table)


@datasets_app.command("export")
def export_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="NAME[@vN]"),
    fmt: str = typer.Option(..., "--format", "-f", help="One of: " + ", ".join(EXPORTERS) + "."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder or s3://bucket/prefix."),
    option: list[str] = typer.Option([], "--option", help="Export option key=value (repeatable), e.g. threshold=0.5, labels=soft, consensus=mc-and-judge."),
    dedup: bool = typer.Option(False, "--dedup", help="Leave out exact and near-duplicate problems (MinHash LSH) and all their rows."),
    decontaminate: list[str] = typer.Option([], "--decontaminate", help="Benchmark file (JSONL/JSON/CSV/Parquet; repeatable) whose problems are left out (n-gram overlap)."),
) -> None:
    """Export a version to a training format (Parquet + card with the options; PRM800K also JSONL)."""
    import warnings

    from storage.exports import parse_options, run_export

    with _user_errors():
        obj = _obj(ctx)
        store = obj.store()
        ds, v = _resolve(store, ref)
        # Validated before the output store is opened: opening a local folder creates it.
        opts = parse_options(fmt, _parse_options(option, prefixed=False))
        with warnings.catch_warnings(record=True):  # shown below, once, as our own line
            warnings.simplefilter("always")
            # Opened here, not by path inside run_export, so an s3:// target gets --endpoint-url, --region,
            # --profile and --credentials-block like the source root.
            from storage.dedup import DecontamConfig, DedupConfig

            record = run_export(store, ds, v, fmt, obj.store(out), opts, dedup=DedupConfig(enabled=dedup),
                                decontaminate=DecontamConfig(benchmarks=decontaminate))
    for w in record["warnings"]:
        err_console.print(Text.assemble(("warning:", "yellow"), f" {w}"), highlight=False, soft_wrap=True)
    console.print(f"exported {ds}@v{v} as {fmt}: {record['rows']} rows -> {record['out']}", highlight=False, soft_wrap=True)
    if record.get("filters"):
        f = record["filters"]
        reasons = ", ".join(f"{n} {why}" for why, n in f["by_reason"].items()) or "none"
        console.print(f"filters: {f['problems_dropped']} problems left out ({reasons}); listed in export.json", highlight=False)
    consensus = (record.get("stats") or {}).get("consensus")
    if consensus and consensus.get("rule") != "none":
        console.print(consensus["line"], highlight=False, soft_wrap=True)
    console.print(f'load it: load_dataset("parquet", data_files="{record["out"]}/data/*.parquet")', highlight=False, soft_wrap=True)


@datasets_app.command("publish")
def publish_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="NAME[@vN]"),
    repo: str = typer.Option(..., "--repo", help="Hub dataset repo, org/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (refused when it already exists and is public)."),
    export: list[str] = typer.Option([], "--export", help="Formats to publish (repeatable); default: every format with rows."),
    option: list[str] = typer.Option([], "--option", help="format.key=value (repeatable), e.g. trl-prm.threshold=0.5."),
    folder: Optional[str] = typer.Option(None, "--folder", help="Where to build the upload folder (default: a temp dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build and validate the folder, upload nothing."),
    license: str = typer.Option("apache-2.0", "--license", help="License in the card's YAML."),
) -> None:
    """Publish a version on the Hugging Face Hub (one Parquet config per export, a card, tag vN).

    The token comes from $HF_TOKEN or `hf auth login`; the endpoint from $HF_ENDPOINT."""
    # As `stepforge build`: Prefect's own INFO lines would bury the result (set the variable to see them).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.publish import publish_dataset
    from storage.exports import parse_options
    from storage.hub import check_hub_target, validate_repo_id

    with _user_errors():
        obj = _obj(ctx)
        store = obj.store()
        ds, v = _resolve(store, ref)
        opts = _parse_options(option, prefixed=True)
        exports = {f: opts.get(f, {}) for f in export} if export else None
        if exports is not None and set(opts) - set(exports):
            raise ConfigError(f"options given for formats not exported: {sorted(set(opts) - set(exports))}.", field="option")
        # The flow checks all of this too; checking here first keeps a refusal to one line, without the
        # traceback Prefect's console logger prints for a failed flow run.
        validate_repo_id(repo)
        for fmt, fmt_options in (exports or {}).items():
            parse_options(fmt, fmt_options)
        if not dry_run:
            target = check_hub_target(repo, version=v, private=private)
            if target["published_commit"]:
                console.print(f"{ds}@v{v} is already published to {repo} (tag v{v}, commit {target['published_commit'][:12]}); "
                              "nothing uploaded. A published version is not changed: delete the tag on the Hub to republish it.",
                              highlight=False, soft_wrap=True)
                return
        result = publish_dataset(ref=f"{ds}@v{v}", repo=repo, storage=obj.storage, private=private,
                                 exports=exports, folder=folder, dry_run=dry_run, license=license)
    if result.get("already_published"):
        console.print(f"{ds}@v{v} is already published to {repo} (tag {result['tag']}, commit {result['commit'][:12]}); "
                      "nothing uploaded. A published version is not changed: delete the tag on the Hub to republish it.",
                      highlight=False, soft_wrap=True)
        return
    console.print(f"configs: {', '.join(result['configs'])}" + (f" (skipped, no rows: {', '.join(result['skipped'])})" if result["skipped"] else ""), highlight=False)
    if dry_run:
        console.print(f"dry run: folder ready at {result['folder']}", highlight=False, soft_wrap=True)
    else:
        console.print(f"published {ds}@v{v} to {repo} (tag {result['tag']}, commit {result['commit'][:12]})", highlight=False)
