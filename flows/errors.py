"""One line for any failure the CLI reports: what failed and what to do, never rich markup.

`describe` turns stepforge's own errors and the storage/network failures that reach a user (botocore,
pyarrow/s3fs `OSError`s, local file system errors) into one line; `print_error` writes it with markup
off, so text from a config value, a path or a server (`[/b]`) is printed as it is instead of being parsed.
"""

from __future__ import annotations

import errno
from typing import Any

from rich.console import Console
from rich.text import Text

from storage.errors import StepforgeError

__all__ = ["describe", "one_line", "print_error"]

# S3 error codes that mean the keys (not the request) are wrong.
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403", "401", "Forbidden"}
_CHECK_KEYS = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `storage.profile` or `storage.credentials_block`"
_RERUN = "rerun the build to resume from the finished shards"


def one_line(text: Any) -> str:
    """`text` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def _botocore(exc: Exception) -> str | None:
    try:
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, EndpointConnectionError,
                                         NoCredentialsError, ReadTimeoutError)
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(exc.response, dict) else None
        op = getattr(exc, "operation_name", "request")
        if code in _AUTH_CODES or status in (401, 403):
            return f"S3 refused the credentials ({code or status} on {op}); {_CHECK_KEYS}."
        if code in ("NoSuchBucket", "404") and op in ("HeadBucket", "ListObjectsV2", "CreateMultipartUpload", "PutObject"):
            return f"S3 bucket not found ({code} on {op}); create it or fix `storage.root`."
        return f"S3 request failed ({code or status} on {op}): {one_line(err.get('Message', exc))}; {_RERUN}."
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
        return (f"S3 endpoint unreachable: {one_line(exc)}; check `storage.endpoint_url` (or $AWS_ENDPOINT_URL) and "
                f"that the server is up, then {_RERUN}.")
    if isinstance(exc, NoCredentialsError):
        return f"S3: {one_line(exc)}; {_CHECK_KEYS}."
    if isinstance(exc, BotoCoreError):
        return f"S3 request failed: {one_line(exc)}; {_RERUN}."
    return None


def _os_error(exc: OSError) -> str:
    text = one_line(exc)
    lowered = text.lower()
    # pyarrow's and s3fs's S3 errors are OSErrors whose text carries the AWS error.
    if any(word in lowered for word in ("access_denied", "accessdenied", "signaturedoesnotmatch",
                                         "invalidaccesskeyid", "403", "forbidden")):
        return f"S3 refused the credentials: {text}; {_CHECK_KEYS}."
    if any(word in lowered for word in ("aws error", "s3", "curl", "connection refused", "could not connect",
                                         "endpoint")) and not getattr(exc, "filename", None):
        return f"storage request failed: {text}; check `storage.root` and `storage.endpoint_url` and that the " \
               f"server is up, then {_RERUN}."
    where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
    reason = exc.strerror or text
    hint = {
        errno.ENOTDIR: "a part of the path is a regular file",
        errno.EEXIST: "a file is in the way",
        errno.EACCES: "no permission",
        errno.EPERM: "not permitted",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
    }.get(exc.errno or -1)
    why = f"{reason} ({hint})" if hint and hint.lower() not in reason.lower() else reason
    return f"storage: cannot write{where}: {why}; choose a writable folder for `storage.root`, then {_RERUN}."


def describe(exc: BaseException) -> str | None:
    """One line for a failure a user can act on; None for anything else (a bug: show the traceback)."""
    if isinstance(exc, StepforgeError):
        return one_line(exc)
    if isinstance(exc, Exception):
        boto = _botocore(exc)
        if boto is not None:
            return boto
    prefect = _prefect(exc)
    if prefect is not None:
        return prefect
    if isinstance(exc, OSError):
        return _os_error(exc)
    return None


def _prefect(exc: BaseException) -> str | None:
    """The Prefect API the build runs against did not start or does not answer."""
    text = one_line(exc)
    if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in text:
        return ("the local Prefect server did not start in time (a busy machine?); rerun, or raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running "
                "`prefect server start`.")
    try:
        import httpx
    except ImportError:  # pragma: no cover - a dependency of prefect
        return None
    if not isinstance(exc, httpx.HTTPError):
        return None
    try:
        url = str(exc.request.url)
    except RuntimeError:  # raised without a request
        url = ""
    # Only Prefect's own API calls reach here: the policy backend turns its httpx errors into PolicyErrors.
    if "/api/" in url or url.rstrip("/").endswith("/api"):
        return (f"the Prefect API does not answer ({type(exc).__name__}: {text}); check PREFECT_API_URL and that "
                f"the server is running, then rerun the build to resume from the finished shards.")
    return None


def print_error(console: Console, message: str) -> None:
    """`error: <message>` on one line; the message is never parsed for markup or highlighted."""
    console.print(Text.assemble(("error:", "red"), " ", one_line(message)), soft_wrap=True, highlight=False)
