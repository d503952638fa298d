"""A Prefect server that goes away mid-build: a `prefect server start` process of the test's own (its own
SQLite database and port), a `stepforge build` pointed at it with PREFECT_API_URL, and the server killed
once the build has staged its first shard; the build holds its second shard until it has itself seen the
API go (and, for a restart, come back), so the outage always falls mid-build.

- back within Prefect's client retries: the build carries on and commits the reference content hash;
- gone for good: shards and the commit need no API (task states travel as events, which are dropped), so
  the build commits the reference hash, then fails to report its end; the CLI says so in one `error:` line
  (the release is complete, do not rerun) and nothing else. A rerun anyway, against the restarted server,
  gives the reference hash again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO
from storage.objectstore import open_store
from storage.release import list_versions, read_manifest

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
CONFIG = {  # several small shards, run one at a time, with a little policy latency: the build lasts a while
    "dataset": "restarted",
    "source": {"kind": "synthetic", "num_problems": 12, "seed": 0},
    "search": {"algorithm": "math-shepherd", "num_solutions": 2, "k": 8},
    "policy": {"kind": "simulated", "latency_s": 0.03},
    "shard_size": 3,
    "concurrency": {"shards": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`prefect server start` on a fixed port and database, so a restart is the same server."""

    def __init__(self, home: Path) -> None:
        self.home, self.proc, self.started = home, None, False
        self._pick_port()
        self.log = open(home / "server.log", "a")

    def _pick_port(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout_s: float = 240) -> None:
        # The port is picked before the server binds it (a restart must come back on the same one), so something
        # else can take it in between; on the first start that is retried on another port. A restart keeps it.
        for _ in range(5):
            if self._start(timeout_s) or self.started:
                break
            self._pick_port()
        assert self.proc is not None and self.proc.poll() is None, "no free port for the prefect server in 5 tries"
        self.started = True

    def _start(self, timeout_s: float) -> bool:
        """Starts the server; False when its port was already taken (the process says so and exits)."""
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"}
        env.pop("PREFECT_API_URL", None)
        self.log.flush()
        log_from = (self.home / "server.log").stat().st_size
        self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--no-ui", "--analytics-off"], env=env, cwd=self.home, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                log = (self.home / "server.log").read_text()[log_from:]
                # Prefect's own check ("Port N is already in use") or uvicorn's bind error, depending on timing.
                if not self.started and ("already in use" in log or "address already in use" in log.lower()):
                    return False
                raise AssertionError(f"prefect server exited: {log[-2000:]}")
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, not a shutdown
            self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    srv = Server(home)
    srv.start()
    yield srv
    srv.stop()
    srv.log.close()


@pytest.fixture(scope="module")
def reference_hash(prefect_server, tmp_path_factory):
    """The same config built without interruption (in-process, on the session's server)."""
    from flows.build import build_dataset
    from flows.config import BuildConfig

    root = tmp_path_factory.mktemp("reference")
    cfg = BuildConfig.model_validate({**CONFIG, "storage": {"root": str(root)}})
    return build_dataset(cfg)["content_hash"]


# Loaded by the build process (sitecustomize on its PYTHONPATH) when STEPFORGE_TEST_OUTAGE_GATE names a
# folder: the first shard stages freely; the second is held before staging until the build process itself has
# seen the Prefect API fail (file `down`) and, in mode `down-up`, answer again (file `up`). So the outage falls
# mid-build whatever the machine's load, the restart never has to fit a retry window, and the test can assert
# the build saw it.
OUTAGE_GATE = """
import os
import time

if os.environ.get("STEPFORGE_TEST_OUTAGE_GATE"):
    import storage.release as _release

    _stage = _release.stage_shard
    _calls = []

    def _api_answers():
        import httpx

        try:
            return httpx.get(os.environ["PREFECT_API_URL"] + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stage_shard(*args, **kwargs):
        gate, mode = os.environ["STEPFORGE_TEST_OUTAGE_GATE"], os.environ["STEPFORGE_TEST_OUTAGE_MODE"]
        _calls.append(1)
        if len(_calls) == 2:
            while _api_answers():
                time.sleep(0.2)
            open(os.path.join(gate, "down"), "w").close()
            while mode == "down-up" and not _api_answers():
                time.sleep(0.5)
            if mode == "down-up":
                open(os.path.join(gate, "up"), "w").close()
        return _stage(*args, **kwargs)

    _release.stage_shard = stage_shard
"""


def _build(tmp_path: Path, url: str, outage: str | None = None, **env: str) -> subprocess.Popen:
    """A `stepforge build` process; `outage` (`down` or `down-up`) holds its second shard until it has seen
    the API go (and come back): see OUTAGE_GATE."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    path = str(REPO)
    if outage is not None:
        hooks = tmp_path / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(OUTAGE_GATE)
        (tmp_path / "gate").mkdir(exist_ok=True)
        path = f"{hooks}{os.pathsep}{REPO}"
        env = {**env, "STEPFORGE_TEST_OUTAGE_GATE": str(tmp_path / "gate"), "STEPFORGE_TEST_OUTAGE_MODE": outage}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "build", "--config", str(config)],
                            cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": path, **env},
                            start_new_session=True)


def _wait_for_a_staged_shard(tmp_path: Path, build: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    staging = tmp_path / "stepforge-data" / "restarted" / "_staging"
    while not any(staging.glob("**/_DONE.json")):  # a shard's journal entry, written last
        assert build.poll() is None, build.communicate()[0]
        assert time.monotonic() < deadline, "no shard staged"
        time.sleep(0.2)


def _finish(build: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str]:
    try:
        out, _ = build.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGKILL)
        out, _ = build.communicate()
        pytest.fail(f"build still running after {timeout_s} s:\n{out[-3000:]}")
    return build.returncode, out


def test_a_server_back_within_the_client_retries_and_the_build_carries_on(server, tmp_path, reference_hash):
    build = _build(tmp_path, server.url, outage="down-up")
    _wait_for_a_staged_shard(tmp_path, build)  # the second shard is now held until the build sees the outage
    server.stop()
    server.start()
    rc, out = _finish(build)
    assert rc == 0, out[-3000:]
    assert (tmp_path / "gate" / "down").exists() and (tmp_path / "gate" / "up").exists()  # seen mid-build
    store = open_store(str(tmp_path / "stepforge-data"))
    assert list_versions(store, "restarted") == [1]
    assert read_manifest(store, "restarted", 1)["content_hash"] == reference_hash


def test_a_server_gone_for_good_fails_the_build_in_one_line_and_a_rerun_gives_the_reference(server, tmp_path,
                                                                                          reference_hash):
    # One client retry (2 s) instead of five (about a minute): the same path, sooner.
    build = _build(tmp_path, server.url, outage="down", PREFECT_CLIENT_MAX_RETRIES="1")
    _wait_for_a_staged_shard(tmp_path, build)  # held at its second shard until the build sees the API gone
    server.stop()
    rc, out = _finish(build)
    assert (tmp_path / "gate" / "down").exists()  # the build was mid-way when the server went
    assert rc == 1, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip() and "━" not in line]  # the progress bar aside
    errors = [line for line in lines if line.startswith("error:") or "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], out[-3000:]
    assert "Prefect API stopped answering" in errors[0]
    assert "restarted v1 was committed" in errors[0] and "do not rerun" in errors[0]
    store = open_store(str(tmp_path / "stepforge-data"))
    assert list_versions(store, "restarted") == [1]
    assert read_manifest(store, "restarted", 1)["content_hash"] == reference_hash

    server.start()
    rc, out = _finish(_build(tmp_path, server.url))
    assert rc == 0, out[-3000:]
    assert list_versions(store, "restarted") == [1, 2]
    assert read_manifest(store, "restarted", 2)["content_hash"] == reference_hash
