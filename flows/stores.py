"""Opening a store the same way everywhere (build, publish, the datasets CLI): one `StorageConfig`, S3 keys
from the Prefect block it names resolved here, in memory only."""

from __future__ import annotations

import json
from typing import Any

from storage.errors import ConfigError
from storage.objectstore import ObjectStore, S3Credentials, StorageConfig, open_store


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


def open_root(config: StorageConfig, *, credentials: S3Credentials | None = None) -> ObjectStore:
    """The store `config` names; for a remote root, keys come from ``credentials`` (already resolved) or the
    config's ``credentials_block``, else boto3's chain (environment, profile, role)."""
    if credentials is None and config.credentials_block and config.is_remote:
        credentials = block_credentials(config.credentials_block)
    return open_store(config, credentials=credentials)
