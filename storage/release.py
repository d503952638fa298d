"""Immutable, versioned releases: staging per shard, version claims, manifest-last commit, verify, gc.

Layout under a store root::

    <dataset>/_staging/<build_key>/<shard_key>/<table>.parquet + _DONE.json   (journal of a build)
    <dataset>/_leases/<build_key>/<holder>.json                               (builds using that staging)
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import BrokenReleaseError, ConfigError, StorageError
from storage.lease import CLOSING, closing_abandoned, leases, remove_staging_if_unheld
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
    "read_release",
    "scan_root",
    "RootScan",
    "BrokenRelease",
    "verify_release",
    "check_release",
    "ReleaseCheck",
    "manifest_digest",
    "release_file_problems",
    "gc",
    "parse_ref",
]

DONE = "_DONE.json"
MANIFEST = "manifest.json"
CARD = "README.md"
_RESERVED = {"schema_version", "dataset", "version", "parent_version", "created_at", "files", "row_counts", "content_hash",
             "commit_token", "manifest_sha256"}
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
    # The digest is taken over the manifest as readers will parse it (after `default=str`), so `verify` can
    # tell any later edit of its metadata (row counts, seed, config) from the committed text.
    manifest = json.loads(_json(manifest))
    manifest["manifest_sha256"] = manifest_digest(manifest)
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


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    rows: int | None = Field(None, ge=0)


class _ManifestShape(BaseModel):
    """What every reader of a manifest relies on; anything else in it is free-form metadata."""

    model_config = ConfigDict(extra="allow", strict=True)
    dataset: str
    version: int
    files: dict[str, _FileEntry]
    row_counts: dict[str, int]
    content_hash: str


_REL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def _manifest_problem(raw: bytes, dataset: str, version: int) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when ``raw`` is a usable manifest of ``dataset@v<version>``, else (None, why)."""
    if not raw.strip():
        return None, f"{MANIFEST} is empty"
    try:
        manifest = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"{MANIFEST} is not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST} is not a JSON object"
    try:
        _ManifestShape.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return None, f"{MANIFEST} field `{where}`: {err['msg']}{more}"
    if manifest["dataset"] != dataset or manifest["version"] != version:
        return None, (f"{MANIFEST} describes {manifest['dataset']}@v{manifest['version']}, not the folder it is in")
    bad = next((rel for rel in manifest["files"] if not _REL_RE.match(rel) or ".." in rel), None)
    if bad is not None:
        return None, f"{MANIFEST} lists a file outside its version folder: {bad!r}"
    return manifest, None


def read_manifest(store: ObjectStore, dataset: str, version: int) -> dict[str, Any]:
    """The manifest of ``dataset@v<version>``; ``BrokenReleaseError`` when it is unreadable or malformed
    (so a root walk can leave that one release out), ``StorageError`` when the version does not exist."""
    validate_name(dataset)
    key = f"{dataset}/v{version}/{MANIFEST}"
    if not store.exists(key):
        raise StorageError(f"{dataset}@v{version} does not exist (no {key}); see `stepforge datasets list`.", field="dataset", value=f"{dataset}@v{version}")
    manifest, problem = _manifest_problem(store.read_bytes(key), dataset, version)
    if problem is not None:
        raise BrokenReleaseError(dataset, version, problem)
    return manifest  # type: ignore[return-value]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the manifest without its digest."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def release_file_problems(manifest: dict[str, Any], present: dict[str, int]) -> list[str]:
    """What a listing alone shows is wrong with a release: files of the manifest that are missing or have
    another size, and files the manifest does not list. ``present`` maps paths relative to the version
    folder to sizes. Costs no reads, so every root walk can afford it."""
    problems: list[str] = []
    for rel, want in sorted(manifest["files"].items()):
        if rel not in present:
            problems.append(f"missing: {rel}")
        elif present[rel] != want["bytes"]:
            problems.append(f"size mismatch: {rel} (manifest {want['bytes']}, file {present[rel]})")
    for rel in sorted(set(present) - set(manifest["files"]) - {MANIFEST}):
        problems.append(f"unexpected file: {rel}")
    return problems


def _present(store: ObjectStore, dataset: str, version: int) -> dict[str, int]:
    vdir = f"{dataset}/v{version}/"
    return {o.key[len(vdir):]: o.size for o in store.list_info(vdir)}


def read_release(store: ObjectStore, dataset: str, version: int) -> dict[str, Any]:
    """The manifest of a release whose files are all there with their committed sizes; ``BrokenReleaseError``
    (one line, naming `datasets verify`) otherwise. One listing, no data reads."""
    manifest = read_manifest(store, dataset, version)
    problems = [p for p in release_file_problems(manifest, _present(store, dataset, version))
                if not p.startswith("unexpected file")]  # readers never look at unlisted files
    if problems:
        raise BrokenReleaseError(dataset, version, _summary(problems))
    return manifest


@dataclass
class ReleaseCheck:
    """The outcome of ``check_release``: ``problems`` fail a verify, ``notes`` (e.g. an old manifest with no
    digest) are worth saying but are not damage."""

    problems: list[str]
    notes: list[str]


def check_release(store: ObjectStore, dataset: str, version: int) -> ReleaseCheck:
    """Check everything the manifest claims: its own digest, every file's presence, size and sha256, the
    row count of every Parquet file and of every table, the content hash, and that nothing else is there."""
    try:
        manifest = read_manifest(store, dataset, version)
    except BrokenReleaseError as exc:
        return ReleaseCheck([exc.reason], [])
    problems: list[str] = []
    notes: list[str] = []
    want_digest = manifest.get("manifest_sha256")
    if want_digest is None:
        notes.append(f"no digest: {MANIFEST} predates `manifest_sha256`, so its metadata (config, seed, row "
                     "counts) cannot be checked against what was committed")
    elif manifest_digest(manifest) != want_digest:
        problems.append(f"{MANIFEST} was edited after commit: its content no longer matches `manifest_sha256`")
    vdir = f"{dataset}/v{version}"
    present = _present(store, dataset, version)
    problems += [p for p in release_file_problems(manifest, present) if not p.startswith("size mismatch")]
    actual_rows: dict[str, int | None] = {}  # rel -> rows read from the Parquet footer (None: unreadable)
    for rel, want in sorted(manifest["files"].items()):
        if rel not in present:
            continue
        got, size = store.sha256(f"{vdir}/{rel}")
        if got != want["sha256"]:
            problems.append(f"sha256 mismatch: {rel} (manifest {want['sha256'][:12]}, file {got[:12]})")
        if size != want["bytes"]:
            problems.append(f"size mismatch: {rel} (manifest {want['bytes']}, file {size})")
        if rel.endswith(".parquet"):
            fs, path = store.filesystem_path(f"{vdir}/{rel}")
            try:
                actual_rows[rel] = pq.read_metadata(path, filesystem=fs).num_rows
            except (OSError, pa.ArrowException) as exc:
                actual_rows[rel] = None
                problems.append(f"not readable as Parquet: {rel} ({str(exc).splitlines()[0]})")
                continue
            if want.get("rows") != actual_rows[rel]:
                problems.append(f"row count mismatch: {rel} (manifest files[].rows {want.get('rows')}, file {actual_rows[rel]})")
    tables = sorted({rel.split("/", 1)[0] for rel in manifest["files"] if rel.endswith(".parquet")} | set(manifest["row_counts"]))
    for table in tables:
        rels = [rel for rel in manifest["files"] if rel.startswith(f"{table}/") and rel.endswith(".parquet")]
        counts = [actual_rows.get(rel) for rel in rels]
        if any(c is None for c in counts):
            continue  # already reported: a missing or unreadable part has no count to add
        total = sum(c for c in counts if c is not None)
        claimed = manifest["row_counts"].get(table)
        if claimed != total:
            problems.append(f"row count mismatch: table {table} (manifest row_counts {claimed}, files {total})")
    if content_hash(manifest["files"]) != manifest.get("content_hash"):
        problems.append("content_hash does not match the manifest's file list")
    return ReleaseCheck(problems, notes)


def verify_release(store: ObjectStore, dataset: str, version: int) -> list[str]:
    """Problems found by ``check_release``, one line each; an empty list when the release is intact."""
    return check_release(store, dataset, version).problems


@dataclass(frozen=True)
class BrokenRelease:
    """A damaged visible release. ``left_out``: its data cannot be served as committed (manifest unreadable,
    a file missing or resized); otherwise only files the manifest does not list were found, which readers
    ignore (they read exactly the manifest's files), so the release stays usable and is only reported."""

    dataset: str
    version: int
    reason: str
    left_out: bool = True

    def line(self) -> str:
        """One line for a user: which release, what is wrong, what happens to it, what to run."""
        ref = f"{self.dataset}@v{self.version}"
        what = "is damaged and left out" if self.left_out else "holds files its manifest does not list, which are ignored"
        return f"{ref} {what} ({self.reason}); run `stepforge datasets verify {ref}`"


@dataclass
class RootScan:
    """Visible releases of a root, found by one listing and one manifest read per version (no data reads):
    ``manifests`` of the usable ones, and ``broken`` for every damaged one (usable or not)."""

    manifests: dict[tuple[str, int], dict[str, Any]]
    broken: list[BrokenRelease]

    def versions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for ds, v in sorted(self.manifests):
            out.setdefault(ds, []).append(v)
        return out


def _summary(problems: list[str]) -> str:
    return problems[0] + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")


def scan_root(store: ObjectStore, dataset: str | None = None) -> RootScan:
    """Every visible release (of ``dataset``, or of all datasets), sorted into usable and damaged. Left out:
    an unreadable or malformed manifest, files missing or of another size. Kept but reported: files the
    manifest does not list. A damaged release never stops the walk; callers report ``BrokenRelease.line``."""
    prefix = f"{validate_name(dataset)}/" if dataset else ""
    sizes: dict[tuple[str, int], dict[str, int]] = {}
    for info in store.list_info(prefix):
        parts = info.key.split("/", 2)
        if len(parts) == 3 and is_valid_name(parts[0]) and (m := _VERSION_RE.match(parts[1])):
            sizes.setdefault((parts[0], int(m.group(1))), {})[parts[2]] = info.size
    manifests: dict[tuple[str, int], dict[str, Any]] = {}
    broken: list[BrokenRelease] = []
    for (ds, v), present in sorted(sizes.items()):
        if MANIFEST not in present:
            continue  # not visible: an unfinished commit, which `gc` collects
        try:
            manifest = read_manifest(store, ds, v)
        except BrokenReleaseError as exc:
            broken.append(BrokenRelease(ds, v, exc.reason))
            continue
        except StorageError:
            continue  # removed between the listing and the read
        problems = release_file_problems(manifest, present)
        fatal = [p for p in problems if not p.startswith("unexpected file")]
        if fatal:
            broken.append(BrokenRelease(ds, v, _summary(fatal)))
            continue
        if problems:
            broken.append(BrokenRelease(ds, v, _summary(problems), left_out=False))
        manifests[(ds, v)] = manifest
    return RootScan(manifests, broken)


def gc(store: ObjectStore, dataset: str | None = None, *, older_than_s: float = 3600) -> list[str]:
    """Remove invisible leftovers: claims and version folders without a manifest, staging folders that no
    live build holds (``storage.lease``), and the leases of killed builds.

    Anything changed within ``older_than_s`` seconds is kept, since it may belong to a running build
    (pass 0 to remove everything regardless of age; staging under a live lease is kept even then).
    Returns the removed keys/prefixes.
    """
    removed: list[str] = []
    now = time.time()
    datasets = [validate_name(dataset)] if dataset else _dataset_folders(store)
    for ds in datasets:
        infos = store.list_info(f"{ds}/")
        visible = set(list_versions(store, ds))
        groups: dict[str, list] = {}
        lease_dirs: set[str] = set()
        for info in infos:
            parts = info.key.split("/")
            if len(parts) >= 3 and parts[1] == "_claims" and (m := _VERSION_RE.match(parts[2])):
                if int(m.group(1)) not in visible:
                    # A claim and its unfinished folder live and die together: the folder's newest file
                    # keeps an active commit's claim alive however old the claim itself is.
                    groups.setdefault(f"{ds}/v{m.group(1)}/", []).append(info)
            elif len(parts) >= 4 and parts[1] == "_staging":
                groups.setdefault(f"{ds}/_staging/{parts[2]}/", []).append(info)
            elif len(parts) >= 4 and parts[1] == "_leases":
                lease_dirs.add(parts[2])
            elif len(parts) >= 3 and (m := _VERSION_RE.match(parts[1])) and int(m.group(1)) not in visible:
                groups.setdefault(f"{ds}/{parts[1]}/", []).append(info)
        for target, members in sorted(groups.items()):
            if older_than_s and mtime_age(members, now) < older_than_s:
                continue
            if target.startswith(f"{ds}/_staging/"):
                # Through the lease protocol, so a build arriving meanwhile never loses its staging; one
                # that a running build holds stays, however old its files are.
                if remove_staging_if_unheld(store, ds, target.split("/")[2]):
                    removed.append(target)
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
        # Leases of killed builds, and a `_closing` marker whose remover died midway.
        for bk in sorted(lease_dirs):
            for lease in leases(store, ds, bk):
                if not lease.live and lease.age_s >= older_than_s:
                    store.delete(lease.key)
                    removed.append(lease.key)
            closing = f"{ds}/_leases/{bk}/{CLOSING}"
            if closing_abandoned(store, closing):
                store.delete(closing)
                removed.append(closing)
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
