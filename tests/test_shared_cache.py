"""The rollout cache a team shares: content-addressed segments under `<root>/_cache/rollouts/`, pushed when a
shard finishes and pulled into each machine's SQLite replica when a shard starts. Two `stepforge build`
processes with separate home folders on one moto S3 root (and on one local root): the second asks the policy
nothing and commits byte-identical tables. Damaged segments and a failing store cost hits, never the build."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows import shared_cache
from storage.objectstore import open_store
from storage.release import read_manifest
from storage.rollout_segments import PREFIX, BadSegment, list_segments, read_segment, segment_key, write_segment
from tasks.policy.base import Completion
from tasks.search.rollout_cache import RolloutCache

from conftest import REPO
from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401 - fixtures


def _completions(text: str) -> list[Completion]:
    return [Completion(text=text, finish_reason="stop", prompt_tokens=3, completion_tokens=2)]


@pytest.fixture
def logged(caplog):
    """Warnings of the shared cache outside a Prefect run (Prefect's logging setup stops propagation)."""
    import logging

    lg = logging.getLogger("stepforge.shared_cache")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=lg.name):
            yield caplog
    finally:
        lg.removeHandler(caplog.handler)


def _key(i: int) -> str:
    return f"{i:064x}"


# -- segments and the replica (no Prefect) -------------------------------------------------------------------
def test_a_pushed_segment_serves_another_replica_and_is_not_published_again(tmp_path):
    store = open_store(str(tmp_path / "root"))
    a = RolloutCache(tmp_path / "a.sqlite")
    for i in range(3):
        a.put(_key(i), _completions(f"step {i}"))
    key = shared_cache.push(store, a)
    assert key is not None and key.startswith(PREFIX) and list_segments(store) == [key]
    assert a.unshared() == [] and shared_cache.push(store, a) is None, "published rows are not sent twice"
    assert key == segment_key(read_segment(store, key)), "the name is the digest of the rows"

    b = RolloutCache(tmp_path / "b.sqlite")
    b.put(_key(9), _completions("b's own"))
    report = shared_cache.pull(store, b)
    assert (report.segments, report.rows, report.skipped) == (1, 3, 0)
    assert [c.text for c in b.get(_key(1))] == ["step 1"]
    assert shared_cache.pull(store, b).segments == 0, "a segment is read once per replica"
    # b publishes only what it made itself; a reads b's segment and now has all four.
    b_key = shared_cache.push(store, b)
    assert [k for k, _ in read_segment(store, b_key)] == [_key(9)]
    assert shared_cache.pull(store, a).rows == 1 and a.get(_key(9)) is not None


def test_equal_rows_make_one_segment_whoever_writes_them(tmp_path):
    store = open_store(str(tmp_path / "root"))
    rows = [(_key(2), "[]"), (_key(1), "[]")]
    assert write_segment(store, rows) == write_segment(store, list(reversed(rows)))
    assert len(list_segments(store)) == 1
    store.write_bytes(PREFIX + "notes.txt", b"not a segment")  # other files under the prefix are ignored
    assert len(list_segments(store)) == 1


def test_a_damaged_segment_is_named_and_left_out_while_good_ones_still_serve(tmp_path, logged):
    store = open_store(str(tmp_path / "root"))
    a = RolloutCache(tmp_path / "a.sqlite")
    a.put(_key(1), _completions("good"))
    shared_cache.push(store, a)
    bad_key = PREFIX + "seg-" + "f" * 32 + ".parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["not-a-key"], "completions": ["[]"]}), buf)
    store.write_bytes(bad_key, buf.getvalue())
    with pytest.raises(BadSegment, match=r"row 0: field 'key' is not a rollout cache key") as info:
        read_segment(store, bad_key)
    assert info.value.field == "key"
    bad_payload = PREFIX + "seg-" + "e" * 32 + ".parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": [_key(5)], "completions": [json.dumps([{"no": "text"}])]}), buf)
    store.write_bytes(bad_payload, buf.getvalue())

    b = RolloutCache(tmp_path / "b.sqlite")
    report = shared_cache.pull(store, b)
    assert (report.segments, report.rows, report.skipped) == (1, 1, 2)
    assert bad_key in logged.text and f"rollout {_key(5)}: field 'completions'" in logged.text
    assert b.get(_key(1)) is not None and b.get(_key(5)) is None
    assert shared_cache.pull(store, b).skipped == 0, "a damaged segment is named once, not on every shard"


def test_a_store_that_fails_costs_hits_not_the_build(tmp_path, logged):
    class Down:
        def list(self, prefix: str = "") -> list[str]:
            raise OSError("connection refused")

        def create_exclusive(self, key: str, data: bytes) -> bool:
            raise OSError("connection refused")

    cache = RolloutCache(tmp_path / "a.sqlite")
    cache.put(_key(1), _completions("x"))
    assert shared_cache.pull(Down(), cache).segments == 0  # type: ignore[arg-type]
    assert shared_cache.push(Down(), cache) is None  # type: ignore[arg-type]
    assert "cache not read" in logged.text and "cache not written" in logged.text and "connection refused" in logged.text
    assert [k for k, _ in cache.unshared()] == [_key(1)], "kept for the next shard's push"


def test_segments_round_trip_on_s3(s3_root, tmp_path):
    store = open_store(s3_root)
    a = RolloutCache(tmp_path / "a.sqlite")
    a.put(_key(7), _completions("over http"))
    key = shared_cache.push(store, a)
    assert list_segments(store) == [key]
    b = RolloutCache(tmp_path / "b.sqlite")
    assert shared_cache.pull(store, b).rows == 1 and [c.text for c in b.get(_key(7))] == ["over http"]


# -- two build processes, two home folders, one root -----------------------------------------------------------
CONFIG = {"source": {"kind": "synthetic", "num_problems": 24, "seed": 6}, "shard_size": 8,
          "search": {"algorithm": "math-shepherd", "num_solutions": 2, "k": 8}}


def _build_in(home: Path, cwd: Path, config: Path) -> None:
    """`stepforge build` in its own process, with its own home folder (so its own replica for S3 roots and
    its own Prefect home), against the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "build", "--config", str(config)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _write_config(tmp_path: Path, root: str) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "storage": {"root": root}}))
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_second_machine_on_one_s3_root_is_served_from_the_firsts_rollouts(s3_root, tmp_path):
    config = _write_config(tmp_path, s3_root)
    _build_in(tmp_path / "home-a", tmp_path, config)
    store = open_store(s3_root)
    first = read_manifest(store, "demo", 1)
    assert first["stats"]["policy_requests"] > 0 and first["stats"]["cache_hits"] == 0
    assert list_segments(store), "the first machine published its rollouts on the root"
    assert (tmp_path / "home-a" / ".cache" / "stepforge" / "rollouts.sqlite").is_file()
    assert not (tmp_path / "home-b").exists()

    _build_in(tmp_path / "home-b", tmp_path, config)
    second = read_manifest(store, "demo", 2)
    # Every request the first machine sent to the policy is a cache hit on the second: none sent.
    assert second["stats"]["policy_requests"] == 0 and second["stats"]["rollouts"] == 0
    assert second["stats"]["cache_hits"] == first["stats"]["policy_requests"]
    assert second["content_hash"] == first["content_hash"]  # every file byte-identical
    for table in ("steps", "pairs", "nodes", "problems"):
        assert ({k: v["sha256"] for k, v in second["files"].items() if k.startswith(table)}
                == {k: v["sha256"] for k, v in first["files"].items() if k.startswith(table)})


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_local_root_shares_rollouts_the_same_way(tmp_path):
    root = tmp_path / "shared-folder"
    config = _write_config(tmp_path, str(root))
    _build_in(tmp_path / "home-a", tmp_path, config)
    store = open_store(str(root))
    first = read_manifest(store, "demo", 1)
    assert list_segments(store) and first["stats"]["policy_requests"] > 0
    # The second machine mounts the folder but not the first's SQLite replica: the segments alone serve it.
    for sqlite in (root / "_cache").glob("rollouts.sqlite*"):
        sqlite.unlink()
    _build_in(tmp_path / "home-b", tmp_path, config)
    second = read_manifest(store, "demo", 2)
    assert second["stats"]["policy_requests"] == 0 and second["stats"]["cache_hits"] == first["stats"]["policy_requests"]
    assert second["content_hash"] == first["content_hash"]


def test_without_hard_links_objects_appear_whole_and_once(tmp_path, monkeypatch):
    """A filesystem without link(2) (some network and FUSE mounts): create_exclusive still publishes whole
    objects only (a reader polling the key sees nothing or everything, never a torn segment that the
    shared cache would then refuse for good), one writer wins, and a deleted key can be created again."""
    import errno
    import threading

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = open_store(str(tmp_path / "root"))
    rows = [(f"{i:064x}", json.dumps([os.urandom(3000).hex(), i])) for i in range(4000)]  # ~12 MB: slow to write
    key = segment_key(rows)
    path = tmp_path / "root" / key
    sizes: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                sizes.add(path.stat().st_size)
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert write_segment(store, rows) == key
    finally:
        stop.set()
        watcher.join()
    assert sizes <= {path.stat().st_size}  # never seen partly written
    assert read_segment(store, key) == sorted(rows) and list_segments(store) == [key]
    assert store.create_exclusive(key, b"other") is False and read_segment(store, key) == sorted(rows)
    assert store.create_exclusive("claims/v1", b"a") and not store.create_exclusive("claims/v1", b"b")
    assert store.read_bytes("claims/v1") == b"a" and store.list("claims/") == ["claims/v1"]
    store.delete("claims/v1")
    assert store.create_exclusive("claims/v1", b"c") and store.read_bytes("claims/v1") == b"c"
