"""A small object-store interface over a local folder or an S3 prefix, addressed by relative keys.

Keys are ``/``-separated paths relative to the store's root (``demo/v1/steps/part-00000.parquet``).
Both implementations give the same guarantees the release protocol relies on:

- ``write_bytes`` is atomic: a reader sees the old object, the new one, or nothing (local: temp file +
  ``os.replace``; S3: a single PUT is atomic by itself).
- ``open_write`` streams an object in pieces with the same atomicity (local: the temp file is renamed into
  place on success; S3: a multipart upload completes on success), hashing as it goes; memory stays at one
  part (S3) whatever the object's size, and a write that fails or is interrupted leaves nothing visible.
- ``create_exclusive`` succeeds for exactly one writer (local: a temp file hard-linked into place; S3:
  conditional PUT with ``If-None-Match: *``, answered 412 when the key exists). Its data may be bytes or a
  binary file read from where it stands, so an object larger than memory (a compacted rollout segment
  spooled to disk) is created without being held.

Credentials come from boto3's chain (environment, ``AWS_PROFILE``/``profile``, instance roles) or an
explicit ``S3Credentials`` (e.g. read from a Prefect block by the flow). They are resolved once by boto3 and
handed in memory to the other clients (pyarrow ``S3FileSystem``, DuckDB's TEMPORARY secret, fsspec
``storage_options``), so every client sees the same identity; ``S3Credentials`` hides its secrets from
``repr`` and nothing here ever writes them to a file or a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Protocol, runtime_checkable

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.errors import ConfigError, StorageError
from storage.secrets import url_credential_problem

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "DEFAULT_ROOT",
    "ObjectInfo",
    "ObjectStore",
    "ObjectWriter",
    "LocalStore",
    "S3Credentials",
    "S3Store",
    "StorageConfig",
    "is_remote_root",
    "open_store",
    "validate_name",
]

DEFAULT_ROOT = "./stepforge-data"

# A dataset name is one path segment: starts alphanumeric (so ``_staging``/``_claims`` stay reserved),
# then letters, digits, ``.``, ``_``, ``-``. No ``/``, ``@`` (the ref separator), spaces or ``..``.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_MARK = ".stepforge-tmp-"
_CHUNK = 8 << 20
# A single PUT/CopyObject is limited to 5 GiB; above this boto3's managed (multipart) transfers take over.
_SINGLE_PUT_MAX = 1 << 30
# Streamed S3 writes: parts of 8 MiB (S3's minimum is 5 MiB, except the last), doubling every 1,000 parts
# so that S3's 10,000-part limit is never the one an object meets first (the 10,000th part ends past 80 TB).
_PART_BYTES = 8 << 20
_PARTS_PER_SIZE = 1000


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be a whole number ≥ 1, got {raw!r}.", field=name, value=raw) from None
    if value < 1:
        raise ConfigError(f"${name} must be a whole number ≥ 1, got {raw!r}.", field=name, value=raw)
    return value


def is_valid_name(name: object) -> bool:
    """A safe single-segment name (dataset, export, table): what ``validate_name`` accepts."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and ".." not in name


def validate_name(name: str, *, field: str = "dataset") -> str:
    """Return ``name`` if it is a safe single-segment name, else raise ``ConfigError`` naming ``field``."""
    if not is_valid_name(name):
        raise ConfigError(
            f"`{field}` must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (no '/', '@', spaces or '..'), got {name!r}.",
            field=field,
            value=name,
        )
    return name


def _check_key(key: str) -> str:
    """Refuse keys that could escape the root; keys are always relative and normalised."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise StorageError(f"invalid object key {key!r}: keys are relative paths without '..' or empty parts.", field="key", value=key)
    return key


def _folder(prefix: str) -> str:
    """Prefix deletes act on whole folders, so ``demo/v1`` can never take ``demo/v10`` with it."""
    prefix = prefix.strip("/")
    _check_key(prefix)
    return prefix + "/"


@dataclass(frozen=True)
class S3Credentials:
    """Explicit S3 keys. The secret parts are excluded from ``repr`` so they cannot reach a log line."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class ObjectWriter:
    """A binary, write-only stream into one object (what ``ObjectStore.open_write`` yields): ``write`` and
    ``tell`` for any writer that takes a file (pyarrow's Parquet writer), the sha256 and size of what was
    written so far. The bytes go to ``emit``; nothing is held here."""

    def __init__(self, key: str, emit: Callable[[memoryview], None]) -> None:
        self.key = key
        self._emit = emit
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        if self.closed:
            raise StorageError(f"write to {self.key!r} after it was closed.", field="key", value=self.key)
        view = memoryview(data).cast("B")
        if view.nbytes:
            self._hash.update(view)
            self._emit(view)
            self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def flush(self) -> None:
        return None

    def close(self) -> None:
        # The object is committed by the context manager, not here: a writer that closes its file (pyarrow
        # does) must not publish an object its caller may still abandon.
        self.closed = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def is_remote_root(root: str) -> bool:
    """Whether ``root`` names a remote store (``s3://...``) rather than a local folder. The one place that
    reads a root's scheme; everything else asks a `StorageConfig` or an open store (`is_remote`)."""
    return root.startswith("s3://")


class StorageConfig(BaseModel):
    """Where releases live, passed whole wherever a store is opened (builds, publish, the datasets CLI, the
    commit event). Holds no secret: it is written to every manifest; credentials come from the environment,
    an AWS profile or a Prefect block named here."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field(DEFAULT_ROOT, description="Local folder or s3://bucket/prefix where releases live.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); default AWS_ENDPOINT_URL.")
    region: str | None = Field(None, description="S3 region; default AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.")
    profile: str | None = Field(None, description="AWS profile (~/.aws/credentials) for s3:// roots; default: boto3's chain.")
    credentials_block: str | None = Field(
        None,
        description="Prefect block with S3 keys, as `BLOCK-TYPE/NAME`: `aws-credentials/...` (prefect-aws) "
        "or `secret/...` holding JSON {aws_access_key_id, aws_secret_access_key[, aws_session_token]}.",
    )
    catalog: str | None = Field(None, description="DuckDB catalog file; default beside the data (local roots).")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # The config is copied into every manifest and card: a key anywhere in the URL would leak there.
        problem = url_credential_problem(v) if v is not None else None
        if problem is not None:
            raise ValueError(f"`storage.endpoint_url` {problem}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                             "`storage.profile` or `storage.credentials_block` instead")
        return v

    @field_validator("credentials_block")
    @classmethod
    def _block_slug(cls, v: str | None) -> str | None:
        if v is not None and v.count("/") != 1:
            raise ValueError(f"`storage.credentials_block` must look like `aws-credentials/<name>` or `secret/<name>`, got {v!r}")
        return v

    @property
    def is_remote(self) -> bool:
        return is_remote_root(self.root)


@runtime_checkable
class ObjectStore(Protocol):
    root: str

    def read_bytes(self, key: str) -> bytes: ...
    def sha256(self, key: str) -> tuple[str, int]: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def open_write(self, key: str) -> "contextlib.AbstractContextManager[ObjectWriter]":
        """Stream an object: ``with store.open_write(key) as w: w.write(...)``. The object appears (whole,
        atomically) when the block ends without an exception; an exception leaves the key as it was."""
        ...
    def create_exclusive(self, key: str, data: bytes | BinaryIO) -> bool:
        """Create ``key`` only if it does not exist (True), else leave it as it is (False). A file is read
        from its current position to its end, in pieces."""
        ...
    def exists(self, key: str) -> bool: ...
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def copy(self, src_key: str, dst_key: str) -> None: ...
    def uri(self, key: str = "") -> str: ...
    def filesystem_path(self, key: str = "") -> tuple[pafs.FileSystem, str]: ...

    @property
    def is_remote(self) -> bool:
        """Whether the data lives on another machine (local caches and catalogs then go elsewhere)."""
        ...

    def settings(self) -> StorageConfig:
        """What reopens this store elsewhere (root, endpoint and region as resolved; never a secret)."""
        ...

    def storage_options(self) -> dict[str, object]:
        """fsspec options reaching the store (``datasets.load_dataset(..., storage_options=...)``, pandas)."""
        ...

    def configure_duckdb(self, con: "duckdb.DuckDBPyConnection") -> None:
        """Make ``con`` able to read this store's files (httpfs and a TEMPORARY secret for S3)."""
        ...


class LocalStore:
    """A folder on the local filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._base = Path(root).expanduser().resolve()
        self.root = str(self._base)
        self._base.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> Path:
        return self._base / _check_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"object {key!r} not found under {self.root}.", field="key", value=key) from None

    @staticmethod
    def _write_temp(path: Path, data: bytes | BinaryIO) -> Path:
        """``data`` durably in a temp file beside ``path`` (hidden from listings), to be moved into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_MARK}{path.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f)  # in 64 KiB pieces
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[ObjectWriter]:
        """A temp file beside the object (hidden from listings), fsynced and renamed into place on success."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_MARK}{path.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                writer = ObjectWriter(key, f.write)
                yield writer
                writer.closed = True
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def create_exclusive(self, key: str, data: bytes | BinaryIO) -> bool:
        # Write a temp file, then hard-link it into place: link(2) fails if the target exists, so exactly one
        # writer wins, and readers never see a half-written object (``open(..., "xb")`` + write would).
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:
                # Filesystems without hard links: claim the key with an exclusive create of a hidden marker,
                # then move the whole temp file into place, so readers never see a half-written object (a
                # reader that did, e.g. the shared rollout cache, would take it for a bad one for good). The
                # marker stays: a later writer finds it and loses, as it would find the object. A writer that
                # dies between claim and move leaves the key claimed and empty (a content-named object is
                # then not shared; a version number is skipped), never a torn object.
                claim = path.with_name(f"{_TMP_MARK}{path.name}.claim")
                try:
                    os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                except FileExistsError:
                    return False
                if path.exists():
                    return False
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def sha256(self, key: str) -> tuple[str, int]:
        """(sha256 hex, size) streamed in chunks, so verifying a large file does not load it whole."""
        h, size = hashlib.sha256(), 0
        try:
            with open(self._path(key), "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise StorageError(f"object {key!r} not found under {self.root}.", field="key", value=key) from None
        return h.hexdigest(), size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        # Walk only the deepest folder the prefix names, then filter by string prefix (S3 semantics).
        start = self._base / prefix.rsplit("/", 1)[0] if "/" in prefix else self._base
        if prefix:
            _check_key(prefix.rstrip("/") or "x")
        out: list[ObjectInfo] = []
        if not start.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self._base).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # create_exclusive's claim marker (filesystems without hard links) goes too, so the key can be
        # created again (a lease's `closing` marker is deleted and re-created).
        path.with_name(f"{_TMP_MARK}{path.name}.claim").unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._base / _folder(prefix), ignore_errors=True)

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise StorageError(f"cannot copy {src_key!r}: not found under {self.root}.", field="key", value=src_key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{_TMP_MARK}{dst.name}.{uuid.uuid4().hex}")
        try:
            # A hardlink is free and safe: files are never modified in place (every write renames).
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else self.root

    def filesystem_path(self, key: str = "") -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), self.uri(key)

    is_remote = False

    def settings(self) -> StorageConfig:
        return StorageConfig(root=self.root)

    def storage_options(self) -> dict[str, object]:
        return {}

    def configure_duckdb(self, con: "duckdb.DuckDBPyConnection") -> None:
        return None  # DuckDB reads local paths as they are


class S3Store:
    """An ``s3://bucket/prefix`` root on AWS or any S3-compatible endpoint (MinIO, R2, moto).

    boto3 does the object calls; ``filesystem_path`` (pyarrow), ``storage_options`` (fsspec/``datasets``)
    and ``duckdb_secret_options`` hand the same endpoint and resolved credentials to the readers.
    """

    def __init__(
        self,
        root: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        credentials: S3Credentials | None = None,
    ) -> None:
        import boto3  # imported here so local-only users never pay for it
        from botocore.config import Config

        rest = root[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ConfigError(f"`storage.root` must look like s3://bucket[/prefix], got {root!r}.", field="storage.root", value=root)
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_key(self.prefix)
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.profile = profile
        session_kwargs: dict[str, object] = {"profile_name": profile} if profile else {}
        if credentials is not None:
            session_kwargs.update(
                aws_access_key_id=credentials.access_key_id,
                aws_secret_access_key=credentials.secret_access_key,
                aws_session_token=credentials.session_token,
            )
        self._session = boto3.session.Session(**session_kwargs)  # type: ignore[arg-type]
        # S3-compatible servers (MinIO, moto, R2 custom domains) need path-style URLs; AWS takes both.
        # Retries: 6 attempts in all in standard mode unless the user set AWS's own variables (an explicit
        # Config would otherwise override them), e.g. AWS_MAX_ATTEMPTS=1 to fail fast on a wrong endpoint.
        # AWS_MAX_ATTEMPTS counts attempts, botocore's `max_attempts` counts retries: `total_max_attempts`.
        config = Config(
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            retries={"total_max_attempts": _env_int("AWS_MAX_ATTEMPTS", 6),
                     "mode": os.environ.get("AWS_RETRY_MODE") or "standard"},
        )
        self._client = self._session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        self._fs: pafs.S3FileSystem | None = None

    def __repr__(self) -> str:  # endpoint and region only: never credentials
        return f"S3Store({self.root!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    is_remote = True

    def settings(self) -> StorageConfig:
        return StorageConfig(root=self.root, endpoint_url=self.endpoint_url, region=self.region, profile=self.profile)

    def configure_duckdb(self, con: "duckdb.DuckDBPyConnection") -> None:
        """httpfs, and this store's endpoint and resolved credentials as a TEMPORARY secret scoped to its
        bucket: the secret lives in the connection only, never in a catalog file."""
        _load_httpfs(con)
        body = ", ".join(["TYPE s3"] + [f"{k} {sql_literal(v)}" for k, v in self.duckdb_secret_options().items()])
        con.execute(f"CREATE OR REPLACE TEMPORARY SECRET stepforge_s3 ({body})")

    # -- credentials handed to the other clients (in memory only) ----------------------------------

    def credentials(self) -> S3Credentials | None:
        """The identity boto3 resolved (env, profile, explicit keys, instance role), or ``None`` (anonymous)."""
        creds = self._session.get_credentials()
        if creds is None:
            return None
        frozen = creds.get_frozen_credentials()
        return S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def _credential_options(self, key: str, secret: str, token: str, anonymous: str | None) -> dict[str, object]:
        """The resolved credentials under one client's option names; ``anonymous`` set where there are none."""
        creds = self.credentials()
        if creds is None:
            return {anonymous: True} if anonymous else {}
        out: dict[str, object] = {key: creds.access_key_id, secret: creds.secret_access_key}
        if creds.session_token:
            out[token] = creds.session_token
        return out

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options (for ``datasets.load_dataset(..., storage_options=...)`` and pandas)."""
        opts: dict[str, object] = {"client_kwargs": {"region_name": self.region}}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
            opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        opts.update(self._credential_options("key", "secret", "token", "anon"))
        return opts

    def duckdb_secret_options(self) -> dict[str, str]:
        """Options of a DuckDB ``CREATE TEMPORARY SECRET (TYPE s3, ...)`` scoped to this bucket."""
        opts = {"REGION": self.region, "SCOPE": f"s3://{self.bucket}"}
        opts.update({k: str(v) for k, v in self._credential_options("KEY_ID", "SECRET", "SESSION_TOKEN", None).items()})
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            opts.update(ENDPOINT=host.rstrip("/"), URL_STYLE="path", USE_SSL="true" if scheme == "https" else "false")
        return opts

    # -- keys -----------------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @staticmethod
    def _code(exc: Exception) -> str:
        resp = getattr(exc, "response", {}) or {}
        return str(resp.get("Error", {}).get("Code", "")) or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))

    def _missing(self, exc: Exception) -> bool:
        return self._code(exc) in ("404", "NoSuchKey", "NotFound")

    # -- objects ----------------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if self._missing(exc):
                raise StorageError(f"object {key!r} not found under {self.root}.", field="key", value=key) from None
            raise

    def sha256(self, key: str) -> tuple[str, int]:
        from botocore.exceptions import ClientError

        h, size = hashlib.sha256(), 0
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise StorageError(f"object {key!r} not found under {self.root}.", field="key", value=key) from None
            raise
        for chunk in body.iter_chunks(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    def write_bytes(self, key: str, data: bytes) -> None:
        if len(data) <= _SINGLE_PUT_MAX:
            self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        else:  # multipart: still atomic, the object appears only when CompleteMultipartUpload succeeds
            import io

            self._client.upload_fileobj(io.BytesIO(data), self.bucket, self._k(key))

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[ObjectWriter]:
        """A multipart upload, one part buffered at a time; the object appears when the upload completes, and
        an exception aborts it. An object smaller than one part goes up as one PUT (no upload is started).
        A process killed mid-write leaves an incomplete upload: invisible to readers, and removed by the
        bucket's lifecycle rule ``AbortIncompleteMultipartUpload`` (set one on production buckets)."""
        upload = _MultipartUpload(self._client, self.bucket, self._k(key))
        try:
            writer = ObjectWriter(key, upload.add)
            yield writer
            writer.closed = True
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def create_exclusive(self, key: str, data: bytes | BinaryIO) -> bool:
        from botocore.exceptions import ClientError

        # One conditional PUT, bytes or a file alike (boto3 streams a file body). `open_write`'s multipart upload
        # is not conditional, so an exclusive object is limited to a single PUT's 5 GiB.
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            # 412: the key exists; 409 ConditionalRequestConflict: a concurrent conditional write won.
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise
        return True

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        if prefix:
            _check_key(prefix.rstrip("/") or "x")
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        out: list[ObjectInfo] = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.key)

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(_folder(prefix))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys per call
            batch = [{"Key": self._k(k)} for k in keys[i : i + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def copy(self, src_key: str, dst_key: str) -> None:
        from botocore.exceptions import ClientError

        # Server-side copy: the bytes never travel through this process. The managed `copy` switches to a
        # multipart copy above CopyObject's 5 GiB limit.
        source = {"Bucket": self.bucket, "Key": self._k(src_key)}
        try:
            self._client.copy(source, self.bucket, self._k(dst_key))
        except ClientError as exc:
            if self._missing(exc):
                raise StorageError(f"cannot copy {src_key!r}: not found under {self.root}.", field="key", value=src_key) from None
            raise

    def uri(self, key: str = "") -> str:
        return f"{self.root}/{_check_key(key)}" if key else self.root

    def filesystem_path(self, key: str = "") -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            kwargs: dict[str, object] = {"region": self.region}
            if self.endpoint_url:
                scheme, _, host = self.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https", force_virtual_addressing=False)
            kwargs.update(self._credential_options("access_key", "secret_key", "session_token", "anonymous"))
            self._fs = pafs.S3FileSystem(**kwargs)
        path = f"{self.bucket}/{self._k(key)}" if key else f"{self.bucket}/{self.prefix}".rstrip("/")
        return self._fs, path


class _MultipartUpload:
    """The parts of one streamed S3 object: bytes collect in a buffer of the current part size and go up as
    a part when it is full; ``complete`` sends the rest (or the whole object as one PUT if no part went)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, object]] = []

    def _part_size(self) -> int:
        return _PART_BYTES << (len(self._parts) // _PARTS_PER_SIZE)

    def add(self, data: memoryview) -> None:
        self._buf += data
        while len(self._buf) >= self._part_size():
            size = self._part_size()
            self._send(bytes(self._buf[:size]))
            del self._buf[:size]

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        etag = self._client.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                        PartNumber=number, Body=body)["ETag"]
        self._parts.append({"PartNumber": number, "ETag": etag})

    def complete(self) -> None:
        if self._upload_id is None:  # small object: one PUT, atomic by itself
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buf))
            self._buf = bytearray()
            return
        if self._buf:
            self._send(bytes(self._buf))
            self._buf = bytearray()
        self._client.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                               MultipartUpload={"Parts": self._parts})
        self._upload_id = None

    def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)
            except Exception:  # the original error matters more; an orphaned upload is invisible anyway
                pass


def open_store(config: StorageConfig | str | None = None, *, credentials: S3Credentials | None = None) -> ObjectStore:
    """Open the store a `StorageConfig` names: a local folder (default ``./stepforge-data``) or
    ``s3://bucket/prefix`` (a plain string is a root with default settings).

    ``endpoint_url``/``region``/``profile`` apply to ``s3://`` roots only; unset, they come from
    ``AWS_ENDPOINT_URL``, ``AWS_REGION`` and boto3's usual credential chain. ``credentials``: keys already
    resolved (e.g. from the config's Prefect block, by ``flows.stores.open_root``)."""
    cfg = config if isinstance(config, StorageConfig) else StorageConfig(root=config or DEFAULT_ROOT)
    if cfg.is_remote:
        return S3Store(cfg.root, endpoint_url=cfg.endpoint_url, region=cfg.region, profile=cfg.profile,
                       credentials=credentials)
    if "://" in cfg.root:
        raise ConfigError(f"`storage.root` must be a local path or s3://bucket/prefix, got {cfg.root!r}.",
                          field="storage.root", value=cfg.root)
    return LocalStore(cfg.root)


def sql_literal(text: str) -> str:
    """A SQL string literal (DDL such as CREATE VIEW / CREATE SECRET takes no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _load_httpfs(con: "duckdb.DuckDBPyConnection") -> None:
    import duckdb

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
    con.execute(f"LOAD {sql_literal(str(found[0]))}")


def mtime_age(infos: list[ObjectInfo], now: float | None = None) -> float:
    """Seconds since the newest object in ``infos`` changed (a folder is as young as its newest file)."""
    if not infos:
        return float("inf")
    return (now if now is not None else time.time()) - max(o.mtime for o in infos)
