"""Dataset names that cannot live side by side on one root, refused before a build does any work.

A dataset name is a folder of the root and the stem of SQL view names in the catalog. Two names collide
when they would share a view (``my-data`` and ``my_data`` both give ``my_data_steps``; ``x`` at v1 and a
dataset ``x_v1`` both give ``x_v1_steps``; DuckDB matches names case-insensitively) or when a name is
already taken by something that is not a dataset (the catalog file ``catalog.duckdb``, the rollout cache
``_cache``, a dataset's own ``_staging``/``_claims``/``_leases`` folders).
"""

from __future__ import annotations

import re
from pathlib import Path

from storage.errors import ConfigError
from storage.objectstore import ObjectStore, is_valid_name

__all__ = ["RESERVED", "sql_stem", "sql_clash", "reserved_reason", "check_dataset_name", "datasets_on_root"]

# Names stepforge itself writes at the top of a root or inside a dataset folder.
RESERVED: dict[str, str] = {
    "catalog.duckdb": "the DuckDB catalog file",
    "catalog.duckdb.wal": "the DuckDB catalog's write-ahead log",
    "_cache": "the rollout cache folder",
    "_staging": "the folder of a build's staged shards",
    "_claims": "the folder of version claims",
    "_leases": "the folder of staging leases",
}
_VERSION_DIR = re.compile(r"^v\d+$")


def sql_stem(dataset: str) -> str:
    """The stem of a dataset's view names, as DuckDB compares them (``My-Data`` → ``my_data``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", dataset).lower()


def sql_clash(a: str, b: str) -> str | None:
    """A view name that datasets ``a`` and ``b`` would both own (e.g. ``my_data_steps``), or ``None``.

    A dataset ``d`` owns ``d_<table>`` (latest), ``d_all_<table>`` and ``d_v<N>_<table>`` for every N, so
    besides equal stems, ``x`` clashes with ``x_all`` and with every ``x_v<N>``.
    """
    if a == b:
        return None
    sa, sb = sql_stem(a), sql_stem(b)
    for short, long in ((sa, sb), (sb, sa)):
        if long == short or (long.startswith(short) and re.fullmatch(r"_(all|v[1-9]\d*)", long[len(short):])):
            return f"{long}_steps"
    return None


def reserved_reason(dataset: str) -> str | None:
    """Why ``dataset`` can never be a dataset name (it is a file or folder stepforge writes), or ``None``."""
    if dataset in RESERVED:
        return f"{dataset!r} is {RESERVED[dataset]}"
    if dataset.lower().endswith((".duckdb", ".duckdb.wal")):
        return f"{dataset!r} is the name of a DuckDB catalog file"
    return None


def datasets_on_root(store: ObjectStore) -> tuple[set[str], set[str]]:
    """(dataset folders, other top-level entries) of a root. A folder is a dataset when stepforge wrote
    into it (a version, staging, claims or leases), committed or not, so two concurrent first builds
    of colliding names are caught too."""
    datasets: set[str] = set()
    others: set[str] = set()
    for key in store.list(""):
        top, sep, rest = key.partition("/")
        if not sep:
            others.add(top)
            continue
        second = rest.split("/", 1)[0]
        if is_valid_name(top) and (_VERSION_DIR.match(second) or second in RESERVED):
            datasets.add(top)
        else:
            others.add(top)
    return datasets, others - datasets


def check_dataset_name(store: ObjectStore, dataset: str, *, catalog: str | None = None) -> None:
    """Refuse ``dataset`` when it cannot live on ``store``'s root beside what is there, naming both.

    ``catalog``: the configured catalog path (``storage.catalog``); when it lies inside a local root its
    top-level name is taken too. Costs one listing of the root.
    """
    reason = reserved_reason(dataset)
    if reason is None and catalog and not store.is_remote:
        try:
            top = Path(catalog).expanduser().resolve().relative_to(Path(store.root).resolve()).parts[0]
        except (ValueError, IndexError):
            top = None
        if top == dataset:
            reason = f"{dataset!r} is the catalog file configured in `storage.catalog`"
    datasets, others = datasets_on_root(store)
    if reason is None and dataset in others:
        reason = f"{store.root}/{dataset} already exists and is not a dataset"
    if reason is not None:
        raise ConfigError(f"`dataset` {reason}; choose another name.", field="dataset", value=dataset)
    for other in sorted(datasets):
        view = sql_clash(dataset, other)
        if view is not None:
            raise ConfigError(
                f"`dataset` {dataset!r} collides with the dataset {other!r} already under {store.root}: both would "
                f"own the SQL view {view!r}; choose another name (or build into {other!r}).",
                field="dataset", value=dataset)
