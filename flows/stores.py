"""Opening a store root the same way everywhere (build, publish, the datasets CLI): endpoint, region and
profile from the caller, S3 keys from a Prefect block resolved here, in memory only."""

from __future__ import annotations

import json
from typing import Any

from storage.errors import ConfigError
from storage.objectstore import ObjectStore, S3Credentials, open_store


def block_credentials(slug: str) -> S3Credentials:
    """S3 keys from a Prefect block (`aws-credentials/<name>` from prefect-aws, or `secret/<name>` holding
    JSON). Resolved inside each task, never passed as a parameter, so keys stay out of Prefect's run records."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(slug)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"`storage.credentials_block` {slug!r} cannot be loaded: {exc}", field="storage.credentials_block",
                          value=slug) from None
    def reveal(value: Any) -> Any:  # SecretStr fields (prefect-aws) or plain strings
        return value.get_secret_value() if hasattr(value, "get_secret_value") else value

    if hasattr(block, "aws_access_key_id"):  # prefect_aws.AwsCredentials
        return S3Credentials(block.aws_access_key_id, reveal(block.aws_secret_access_key) or "",
                             reveal(getattr(block, "aws_session_token", None)))
    raw = block.get() if hasattr(block, "get") else None
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        data = None
    if not isinstance(data, dict) or not data.get("aws_access_key_id") or not data.get("aws_secret_access_key"):
        raise ConfigError(f"`storage.credentials_block` {slug!r} must hold aws_access_key_id and aws_secret_access_key.",
                          field="storage.credentials_block", value=slug)
    return S3Credentials(data["aws_access_key_id"], data["aws_secret_access_key"], data.get("aws_session_token"))


def open_root(root: str, *, endpoint_url: str | None = None, region: str | None = None, profile: str | None = None,
              credentials_block: str | None = None, credentials: S3Credentials | None = None) -> ObjectStore:
    """The store at ``root``; for ``s3://`` roots, keys come from ``credentials`` (already resolved) or the
    ``credentials_block``, else boto3's chain (environment, profile, role)."""
    if credentials is None and credentials_block and root.startswith("s3://"):
        credentials = block_credentials(credentials_block)
    return open_store(root, endpoint_url=endpoint_url, region=region, profile=profile, credentials=credentials)
