"""Immutable, versioned releases: staging per shard, version claims, manifest-last commit, verify, gc.

Layout under a store root::

    <dataset>/_staging/<build_key>/<shard_key>/<table>.parquet + _DONE.json   (journal of a build)
    <dataset>/_claims/v<N>                                                   (who owns version N)
    <dataset>/v<N>/<table>/part-<i:05d>.parquet, README.md, manifest.json     (the release)

Only a version whose ``manifest.json`` exists is visible; the manifest is written last, so a crash at
any earlier point leaves nothing visible and ``gc`` can remove the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import ConfigError, StorageError
from storage.objectstore import ObjectStore, is_valid_name, mtime_age, validate_name
from storage.schema import SCHEMA_VERSION, SCHEMAS, TABLES

__all__ = [
    "FileInfo",
    "write_parquet",
    "stage_key",
    "stage_shard",
    "staged_shard",
    "commit_release",
    "find_commit",
    "list_versions",
    "latest_version",
    "list_datasets",
    "read_manifest",
    "verify_release",
    "gc",
    "parse_ref",
]

DONE = "_DONE.json"
MANIFEST = "manifest.json"
CARD = "README.md"
_RESERVED = {"schema_version", "dataset", "version", "parent_version", "created_at", "files", "row_counts", "content_hash",
             "commit_token"}
_VERSION_RE = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class FileInfo:
    key: str
    sha256: str
    rows: int | None
    bytes: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode()


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise deterministically: no timestamps enter Parquet metadata, so equal tables ⇒ equal bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue().to_pybytes()


def write_parquet(store: ObjectStore, key: str, table: pa.Table) -> FileInfo:
    """Write ``table`` as zstd Parquet at ``key`` (atomically) and return its size, rows and sha256."""
    data = parquet_bytes(table)
    store.write_bytes(key, data)
    return FileInfo(key, _sha256(data), table.num_rows, len(data))


# --- staging (resume by journal) -------------------------------------------------------------------


def _stage_dir(dataset: str, build_key: str, shard_key: str) -> str:
    validate_name(dataset)
    validate_name(build_key, field="build_key")
    validate_name(shard_key, field="shard_key")
    return f"{dataset}/_staging/{build_key}/{shard_key}"


def stage_key(dataset: str, build_key: str, shard_key: str, table: str) -> str:
    validate_name(table, field="table")
    return f"{_stage_dir(dataset, build_key, shard_key)}/{table}.parquet"


def stage_shard(
    store: ObjectStore, dataset: str, build_key: str, shard_key: str, tables: dict[str, pa.Table]
) -> dict[str, FileInfo]:
    """Write a shard's tables, then its ``_DONE.json`` marker last: the marker is the journal entry."""
    infos = {name: write_parquet(store, stage_key(dataset, build_key, shard_key, name), t) for name, t in sorted(tables.items())}
    marker = {name: asdict(info) for name, info in infos.items()}
    store.write_bytes(f"{_stage_dir(dataset, build_key, shard_key)}/{DONE}", _json(marker))
    return infos


def staged_shard(store: ObjectStore, dataset: str, build_key: str, shard_key: str) -> dict[str, FileInfo] | None:
    """The shard's FileInfos if it was staged completely (its marker exists), else ``None``."""
    key = f"{_stage_dir(dataset, build_key, shard_key)}/{DONE}"
    if not store.exists(key):
        return None
    return {name: FileInfo(**info) for name, info in json.loads(store.read_bytes(key)).items()}


# --- commit ----------------------------------------------------------------------------------------


def _claimed_numbers(store: ObjectStore, dataset: str) -> set[int]:
    nums: set[int] = set()
    for key in store.list(f"{dataset}/"):
        parts = key.split("/")
        if len(parts) >= 3 and parts[1] == "_claims" and (m := _VERSION_RE.match(parts[2])):
            nums.add(int(m.group(1)))
        elif len(parts) >= 3 and (m := _VERSION_RE.match(parts[1])):
            nums.add(int(m.group(1)))  # a version folder without a claim still owns its number
    return nums


def _claim_version(store: ObjectStore, dataset: str, build_key: str, commit_token: str | None = None) -> tuple[int, str]:
    """Take the next free version with a conditional create; on a lost race try the next number.

    Returns (version, token); the token lets the committer check, just before publishing, that the claim
    is still its own (``gc`` could have collected a claim left idle for longer than its age limit). A
    retry of the same commit (same ``commit_token``) takes over its own unfinished claim instead of
    leaving a hole in the version numbers.
    """
    if commit_token is not None:
        visible = set(list_versions(store, dataset))
        for key in store.list(f"{dataset}/_claims/"):
            m = _VERSION_RE.match(key.rsplit("/", 1)[-1])
            if not m or int(m.group(1)) in visible:
                continue
            try:
                claim = json.loads(store.read_bytes(key))
            except (StorageError, ValueError):  # collected or half-visible meanwhile: not ours to take
                continue
            if claim.get("commit_token") == commit_token and claim.get("build_key") == build_key:
                return int(m.group(1)), str(claim["token"])
    n = max(_claimed_numbers(store, dataset), default=0) + 1
    token = uuid.uuid4().hex
    body = _json({"build_key": build_key, "claimed_at": _now(), "token": token, "commit_token": commit_token})
    for _ in range(1000):
        if store.create_exclusive(f"{dataset}/_claims/v{n}", body):
            return n, token
        n += 1
    raise StorageError(f"could not claim a version of {dataset!r} after 1000 tries.", field="dataset", value=dataset)


def find_commit(store: ObjectStore, dataset: str, commit_token: str, build_key: str | None = None) -> dict[str, Any] | None:
    """The manifest of the visible version committed with ``commit_token`` (and ``build_key``), or ``None``.

    Newest first: a retried commit looks for the version its earlier attempt made, which is almost always
    among the latest. Costs one manifest read per version when there is no match (small JSON objects).
    """
    for version in reversed(list_versions(store, dataset)):
        try:
            manifest = read_manifest(store, dataset, version)
        except StorageError:
            continue
        if manifest.get("commit_token") == commit_token and (build_key is None or manifest.get("build_key") == build_key):
            return manifest
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over sorted (relative path, file sha256) of the data files only, so the card, times and
    config do not change it: equal data ⇒ equal content hash across versions."""
    h = hashlib.sha256()
    for rel in sorted(k for k in files if k.endswith(".parquet")):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def commit_release(
    store: ObjectStore,
    dataset: str,
    *,
    build_key: str,
    shard_keys: list[str],
    manifest_fields: dict[str, Any],
    card: str | Callable[[dict[str, Any]], str],
    commit_token: str | None = None,
) -> dict[str, Any]:
    """Publish the staged shards of ``build_key`` as the next version of ``dataset``; return its manifest.

    ``commit_token`` makes the commit idempotent: one token per build run (the flow run id), recorded in the
    claim and the manifest. When a version carrying the token already exists, that manifest is returned and
    nothing new is claimed, so a retry after a failure past the manifest (catalog sync, staging cleanup)
    cannot publish the same build twice. A later build of the same config has its own token and makes the
    next version: builds are never deduplicated by ``build_key``.
    """
    validate_name(dataset)
    clash = _RESERVED & set(manifest_fields)
    if clash:
        raise ConfigError(f"`manifest_fields` may not set reserved keys {sorted(clash)}.", field="manifest_fields", value=sorted(clash))
    if commit_token is not None:
        validate_name(commit_token, field="commit_token")
        # Before the staging check: a committed build's staging may already have been cleaned up.
        done = find_commit(store, dataset, commit_token, build_key)
        if done is not None:
            return done
    staged: list[dict[str, FileInfo]] = []
    for shard in shard_keys:
        infos = staged_shard(store, dataset, build_key, shard)
        if infos is None:
            raise StorageError(
                f"shard {shard!r} of build {build_key!r} is not staged (no {DONE}); rerun the build to finish it.",
                field="shard_key",
                value=shard,
            )
        staged.append(infos)

    t0 = time.monotonic()
    version, token = _claim_version(store, dataset, build_key, commit_token)
    vdir = f"{dataset}/v{version}"
    files: dict[str, dict[str, Any]] = {}
    row_counts: dict[str, int] = {}
    names = list(TABLES) + sorted({t for s in staged for t in s} - set(TABLES))
    for table in names:
        parts = [(i, s[table]) for i, s in enumerate(staged) if table in s and (s[table].rows or 0) > 0]
        if not parts:  # one empty part with the schema, so `read_parquet(<table>/*.parquet)` still works
            empty = next((s[table] for s in staged if table in s), None)
            parts = [(0, empty)] if empty is not None else []
        if parts:
            for i, info in parts:
                rel = f"{table}/part-{i:05d}.parquet"
                store.copy(info.key, f"{vdir}/{rel}")
                files[rel] = {"sha256": info.sha256, "rows": info.rows, "bytes": info.bytes}
        elif table in SCHEMAS:
            info = write_parquet(store, f"{vdir}/{table}/part-00000.parquet", SCHEMAS[table].empty_table())
            files[f"{table}/part-00000.parquet"] = {"sha256": info.sha256, "rows": 0, "bytes": info.bytes}
        row_counts[table] = sum(f["rows"] or 0 for rel, f in files.items() if rel.startswith(f"{table}/"))

    visible_before = [v for v in list_versions(store, dataset) if v < version]
    timings = dict(manifest_fields.get("timings") or {})
    manifest: dict[str, Any] = {
        **manifest_fields,
        "build_key": build_key,
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "version": version,
        "parent_version": max(visible_before) if visible_before else None,
        "created_at": _now(),
        "row_counts": row_counts,
        "content_hash": content_hash(files),
        "commit_token": commit_token,
    }
    card_text = (card(dict(manifest, files=dict(files))) if callable(card) else card).encode()
    store.write_bytes(f"{vdir}/{CARD}", card_text)
    files[CARD] = {"sha256": _sha256(card_text), "rows": None, "bytes": len(card_text)}
    manifest["files"] = files
    claim = json.loads(store.read_bytes(f"{dataset}/_claims/v{version}")) if store.exists(f"{dataset}/_claims/v{version}") else {}
    if claim.get("token") != token:
        raise StorageError(
            f"the claim on {dataset}@v{version} was lost before commit (collected by `gc` while this build "
            "was idle?); nothing was published, rerun the build.",
            field="version",
            value=version,
        )
    timings["commit_s"] = round(time.monotonic() - t0, 3)
    manifest["timings"] = timings
    # Last, and conditional: this write makes the version visible, and it can never replace a manifest.
    if not store.create_exclusive(f"{vdir}/{MANIFEST}", _json(manifest)):
        if commit_token is not None:  # an earlier attempt of this very commit finished first
            done = find_commit(store, dataset, commit_token, build_key)
            if done is not None and done["version"] == version:
                return done
        raise StorageError(f"{dataset}@v{version} already has a manifest; nothing was overwritten, rerun the commit.", field="version", value=version)
    return manifest


# --- reading ---------------------------------------------------------------------------------------


def list_versions(store: ObjectStore, dataset: str) -> list[int]:
    validate_name(dataset)
    out = []
    for key in store.list(f"{dataset}/v"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST and (m := _VERSION_RE.match(parts[1])):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_version(store: ObjectStore, dataset: str) -> int | None:
    versions = list_versions(store, dataset)
    return versions[-1] if versions else None


def _dataset_folders(store: ObjectStore) -> list[str]:
    # Folders that cannot be dataset names are not datasets: the rollout cache (`_cache/`) lives beside
    # the data in local roots, and a team may keep other files there.
    return sorted({folder for k in store.list("") if "/" in k if is_valid_name(folder := k.split("/", 1)[0])})


def list_datasets(store: ObjectStore) -> list[str]:
    """Datasets with at least one visible version."""
    out = set()
    for key in store.list(""):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST and _VERSION_RE.match(parts[1]):
            out.add(parts[0])
    return sorted(out)


def read_manifest(store: ObjectStore, dataset: str, version: int) -> dict[str, Any]:
    validate_name(dataset)
    key = f"{dataset}/v{version}/{MANIFEST}"
    if not store.exists(key):
        raise StorageError(f"{dataset}@v{version} does not exist (no {key}); see `stepforge datasets list`.", field="dataset", value=f"{dataset}@v{version}")
    return json.loads(store.read_bytes(key))


def verify_release(store: ObjectStore, dataset: str, version: int) -> list[str]:
    """Re-hash every file the manifest lists; one line per problem, empty list when intact."""
    manifest = read_manifest(store, dataset, version)
    vdir = f"{dataset}/v{version}"
    problems: list[str] = []
    present = {k[len(vdir) + 1 :] for k in store.list(f"{vdir}/")}
    for rel, want in sorted(manifest["files"].items()):
        if rel not in present:
            problems.append(f"missing: {rel}")
            continue
        got, size = store.sha256(f"{vdir}/{rel}")
        if got != want["sha256"]:
            problems.append(f"sha256 mismatch: {rel} (manifest {want['sha256'][:12]}, file {got[:12]})")
        elif size != want["bytes"]:
            problems.append(f"size mismatch: {rel} (manifest {want['bytes']}, file {size})")
    for rel in sorted(present - set(manifest["files"]) - {MANIFEST}):
        problems.append(f"unexpected file: {rel}")
    if content_hash(manifest["files"]) != manifest.get("content_hash"):
        problems.append("content_hash does not match the manifest's file list")
    return problems


def gc(store: ObjectStore, dataset: str | None = None, *, older_than_s: float = 3600) -> list[str]:
    """Remove invisible leftovers: claims and version folders without a manifest, and staging folders.

    Anything changed within ``older_than_s`` seconds is kept, since it may belong to a running build
    (pass 0 to remove everything regardless of age). Returns the removed keys/prefixes.
    """
    removed: list[str] = []
    now = time.time()
    datasets = [validate_name(dataset)] if dataset else _dataset_folders(store)
    for ds in datasets:
        infos = store.list_info(f"{ds}/")
        visible = set(list_versions(store, ds))
        groups: dict[str, list] = {}
        for info in infos:
            parts = info.key.split("/")
            if len(parts) >= 3 and parts[1] == "_claims" and (m := _VERSION_RE.match(parts[2])):
                if int(m.group(1)) not in visible:
                    # A claim and its unfinished folder live and die together: the folder's newest file
                    # keeps an active commit's claim alive however old the claim itself is.
                    groups.setdefault(f"{ds}/v{m.group(1)}/", []).append(info)
            elif len(parts) >= 4 and parts[1] == "_staging":
                groups.setdefault(f"{ds}/_staging/{parts[2]}/", []).append(info)
            elif len(parts) >= 3 and (m := _VERSION_RE.match(parts[1])) and int(m.group(1)) not in visible:
                groups.setdefault(f"{ds}/{parts[1]}/", []).append(info)
        for target, members in sorted(groups.items()):
            if older_than_s and mtime_age(members, now) < older_than_s:
                continue
            keys = {m.key for m in members}
            folder = [k for k in keys if k.startswith(target)]
            if folder:
                store.delete_prefix(target)
                removed.append(target)
            # The claim goes after its folder: while the folder exists its number stays taken.
            for key in sorted(keys - set(folder)):
                store.delete(key)
                removed.append(key)
    return removed


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"demo@v2"`` → ``("demo", 2)``; ``"demo"`` → ``("demo", None)`` (latest)."""
    name, sep, ver = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    m = re.fullmatch(r"v?(\d+)", ver)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"version in {ref!r} must look like @v<N> with N ≥ 1, e.g. {name}@v1.", field="version", value=ver)
    return name, int(m.group(1))
