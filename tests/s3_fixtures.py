"""moto's S3 server on loopback (real HTTP, `ThreadedMotoServer`) for tests of the S3 code paths.

Import the fixtures into a test module (``from s3_fixtures import moto_server, s3_env, s3_root``). The
server lives for the session; each test gets its own bucket, fake keys and ``AWS_ENDPOINT_URL`` in the
environment, exactly as production reads them.
"""

from __future__ import annotations

import socket
import uuid
from typing import Iterator

import pytest

FAKE_KEY_ID = "AKIAFAKESTEPFORGE0001"
FAKE_SECRET = "fake-secret-DO-NOT-LEAK-4c1b9e7f2a"
FAKE_SESSION = "fake-session-token-DO-NOT-LEAK-77aa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1 (a free port)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials and the endpoint in the environment, as a deployment would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_SESSION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    return moto_server


@pytest.fixture
def s3_root(s3_env: str) -> str:
    """``s3://<fresh bucket>/data``: an empty store root for one test."""
    import boto3

    bucket = f"sf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/data"
