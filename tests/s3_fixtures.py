"""moto's S3 server on loopback (real HTTP, `ThreadedMotoServer`) for tests of the S3 code paths.

Import the fixtures into a test module (``from s3_fixtures import moto_server, s3_env, s3_root``). The
server lives for the session; each test gets its own bucket, fake keys and ``AWS_ENDPOINT_URL`` in the
environment, exactly as production reads them.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

FAKE_KEY_ID = "AKIAFAKESTEPFORGE0001"
FAKE_SECRET = "fake-secret-DO-NOT-LEAK-4c1b9e7f2a"
FAKE_SESSION = "fake-session-token-DO-NOT-LEAK-77aa"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1 (a free port)."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a port the kernel picks and reports it. Picking a free port first and binding
    # it later raced with anything taking that port in between, and then `start()` waited forever (moto's
    # server thread dies on EADDRINUSE and never sets its ready event): a hung CI run.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
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


# -- a fault-injecting HTTP proxy in front of moto ---------------------------------------------------------
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade"}
_S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<RequestId>stepforge-fault-proxy</RequestId></Error>')


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto) that can misbehave like a real store:

    - `storm(for_s, slow_s)`: for `for_s` seconds from the next request, requests cycle through
      503 SlowDown, a response held `slow_s` seconds, and a normal answer;
    - `deny()`: every request gets 403 SignatureDoesNotMatch (a wrong secret key);
    - `go_away_after(n)`: after n more requests the proxy stops listening and drops its connections (the
      endpoint went away mid-build).

    Requests are forwarded byte for byte (bodies, chunked uploads, headers other than hop-by-hop ones), so
    every client (boto3, pyarrow's S3 filesystem, DuckDB httpfs) works through it unchanged.
    """

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        self._upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.stats = {"forwarded": 0, "503": 0, "slow": 0, "403": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._storm: tuple[float, float] | None = None  # (seconds, slow_s) armed, starting at the next request
        self._storm_until = 0.0
        self._storm_count = 0
        self._deny = False
        self._go_away_in: int | None = None
        self.gone = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                body = _S3_ERROR.format(code=code, message=message).encode()
                self._answer(status, body, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])

            def _handle(self) -> None:
                import http.client
                import time

                body = self._body()
                action = proxy._next()
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)  # like a crashed endpoint: no answer at all
                    return
                if action == "403":
                    return self._error(403, "SignatureDoesNotMatch", "The request signature we calculated does not "
                                       "match the signature you provided. Check your key and signing method.")
                if action == "503":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if action is not None:  # slow: hold the request, then answer normally
                    time.sleep(action)
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP
                           and (k.lower() != "content-length" or self.command == "HEAD")]
                    if self.command != "HEAD":
                        out.append(("Content-Length", str(len(data))))
                    self._answer(resp.status, data, out)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _next(self) -> str | float | None:
        """What to do with the next request: None (forward), "503", "403", "drop" or a delay in seconds."""
        import time

        with self._lock:
            if self.gone:
                self.stats["dropped"] += 1
                return "drop"
            if self._go_away_in is not None:
                self._go_away_in -= 1
                if self._go_away_in < 0:
                    self.gone = True
                    self.stats["dropped"] += 1
                    import threading

                    threading.Thread(target=self._close_listener, daemon=True).start()
                    return "drop"
            if self._deny:
                self.stats["403"] += 1
                return "403"
            now = time.monotonic()
            if self._storm is not None:  # armed: the storm starts with this request
                self._storm_until = now + self._storm[0]
                self._slow_s = self._storm[1]
                self._storm = None
            if now < self._storm_until:
                self._storm_count += 1
                kind = ("503", "slow", None)[self._storm_count % 3]
                if kind == "503":
                    self.stats["503"] += 1
                    return "503"
                if kind == "slow":
                    self.stats["slow"] += 1
                    return self._slow_s
            self.stats["forwarded"] += 1
            return None

    def _close_listener(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def storm(self, for_s: float, slow_s: float) -> None:
        with self._lock:
            self._storm = (for_s, slow_s)

    def deny(self) -> None:
        with self._lock:
            self._deny = True

    def go_away_after(self, n: int) -> None:
        with self._lock:
            self._go_away_in = n

    def stop(self) -> None:
        if not self.gone:
            self._close_listener()


@pytest.fixture
def s3_proxy(s3_env: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto server (it forwards there: same buckets, same objects)."""
    proxy = FaultProxy(s3_env)
    try:
        yield proxy
    finally:
        proxy.stop()
