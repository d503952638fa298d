"""The rollout cache a team shares: content-addressed segments under `<root>/_cache/rollouts/`, pushed when a
shard finishes and pulled into each machine's SQLite replica when a shard starts. Two `stepforge build`
processes with separate home folders on one moto S3 root (and on one local root): the second asks the policy
nothing and commits byte-identical tables. Damaged segments and a failing store cost hits, never the build.
Compaction folds the segments into one, on a local and a moto root, while a reader that listed the old ones
still gets every row."""

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

from conftest import REPO, arrow_proxy_pool
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


# -- compaction ------------------------------------------------------------------------------------------------
def _store_of(kind: str, request, tmp_path):
    return open_store(str(tmp_path / "root") if kind == "local" else request.getfixturevalue("s3_root"))


def _push(store, tmp_path, name: str, keys: range) -> str:
    cache = RolloutCache(tmp_path / f"{name}.sqlite")
    for i in keys:
        cache.put(_key(i), _completions(f"step {i}"))
    return shared_cache.push(store, cache)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_compaction_folds_segments_into_one_while_a_reader_that_listed_them_gets_every_row(kind, request, tmp_path,
                                                                                          monkeypatch, logged):
    store = _store_of(kind, request, tmp_path)
    old = [_push(store, tmp_path, "a", range(0, 3)), _push(store, tmp_path, "b", range(2, 5)),
           _push(store, tmp_path, "c", range(5, 6))]
    damaged = PREFIX + "seg-" + "f" * 32 + ".parquet"
    store.write_bytes(damaged, b"not parquet")
    union = sorted({row for key in old for row in read_segment(store, key)})

    # The reader lists the three segments (and the damaged one); compaction runs before it reads any of them.
    real_list = shared_cache.list_segments
    listings = []  # the reader's

    def list_then_compact(s):
        keys = real_list(s)
        listings.append(keys)
        if len(listings) == 1:
            monkeypatch.setattr(shared_cache, "list_segments", real_list)  # compaction lists for itself
            compacted = shared_cache.compact(s)
            monkeypatch.setattr(shared_cache, "list_segments", list_then_compact)
            assert sorted(compacted.merged) == sorted(old) and compacted.left.keys() == {damaged}
            assert (compacted.read, compacted.rows, compacted.gone) == (3, 6, 0)
        return keys

    monkeypatch.setattr(shared_cache, "list_segments", list_then_compact)
    reader = RolloutCache(tmp_path / "reader.sqlite")
    report = shared_cache.pull(store, reader)
    # The old segments were gone: the reader listed again and read the one that replaced them.
    assert (report.gone, report.segments, report.rows, report.skipped) == (3, 1, 6, 1)
    assert len(listings) == 2 and all(reader.get(_key(i)) is not None for i in range(6))
    assert "not read now" not in logged.text  # a compacted segment is not a store failure
    monkeypatch.undo()

    new = segment_key(union)
    assert list_segments(store) == sorted([new, damaged])  # the damaged one stays, for a person to look at
    assert read_segment(store, new) == union
    again = shared_cache.compact(store)  # one good segment: nothing to do
    assert (again.key, again.read, again.merged, again.rows) == (new, 1, [], 6)
    # A replica that had read the old segments reads the new one once (nothing new in it) and is done.
    a = RolloutCache(tmp_path / "a.sqlite")
    assert shared_cache.pull(store, a).rows == 3 and shared_cache.pull(store, a).segments == 0


def test_compaction_deletes_nothing_until_the_new_segment_is_written(tmp_path):
    store = open_store(str(tmp_path / "root"))
    old = [_push(store, tmp_path, "a", range(0, 2)), _push(store, tmp_path, "b", range(2, 4))]

    class WriteFails:
        def __getattr__(self, name):
            return getattr(store, name)

        def create_exclusive(self, key: str, data: bytes) -> bool:
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        shared_cache.compact(WriteFails())  # type: ignore[arg-type]
    assert list_segments(store) == sorted(old)

    class ClaimedEmpty(WriteFails):  # the new key exists but holds nothing (a writer died after claiming it)
        def create_exclusive(self, key: str, data: bytes) -> bool:
            return False

    from storage.errors import StorageError

    with pytest.raises(StorageError, match="does not read back as written; nothing deleted"):
        shared_cache.compact(ClaimedEmpty())  # type: ignore[arg-type]
    assert list_segments(store) == sorted(old)


def test_a_segment_pushed_during_compaction_is_kept_and_merged_by_the_next(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "root"))
    old = [_push(store, tmp_path, "a", range(0, 2)), _push(store, tmp_path, "b", range(2, 4))]
    real_write = shared_cache.write_segment
    late: list[str] = []

    def push_meanwhile(s, rows):
        # A shard finishing while compaction runs, after compaction listed the segments.
        late.append(real_write(store, [(_key(i), json.dumps([])) for i in (10, 11)]))
        return real_write(s, rows)

    monkeypatch.setattr(shared_cache, "write_segment", push_meanwhile)
    report = shared_cache.compact(store)
    monkeypatch.undo()
    assert sorted(report.merged) == sorted(old) and late[0] in list_segments(store)
    assert shared_cache.compact(store).merged == sorted([report.key, late[0]])
    (final,) = list_segments(store)
    assert [k for k, _ in read_segment(store, final)] == [_key(i) for i in (0, 1, 2, 3, 10, 11)]


def test_compact_cache_cli_on_a_local_root(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    root = tmp_path / "root"
    store = open_store(str(root))
    for name, keys in (("a", range(0, 2)), ("b", range(2, 3))):
        _push(store, tmp_path, name, keys)
    out = CliRunner().invoke(app, ["datasets", "--root", str(root), "compact-cache"])
    assert out.exit_code == 0, out.output
    (key,) = list_segments(store)
    assert out.output.strip() == f"merged 2 segments into {key} (3 rollouts); 2 removed"
    out = CliRunner().invoke(app, ["datasets", "--root", str(root), "compact-cache"])
    assert out.exit_code == 0 and out.output.strip() == "nothing to compact: 1 segment (3 rollouts)"


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


# -- segments larger than memory: written in row groups, read and compacted a batch at a time -------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_segment_in_many_row_groups_reads_back_whole_and_a_late_bad_row_undoes_only_its_segment(
        kind, request, tmp_path, monkeypatch, logged):
    from storage import rollout_segments

    monkeypatch.setattr(rollout_segments, "ROW_GROUP_ROWS", 7)
    store = _store_of(kind, request, tmp_path)
    key = _push(store, tmp_path, "a", range(50))
    fs, path = store.filesystem_path(key)
    with fs.open_input_file(path) as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 8  # 7 x 7 + 1
    batches = list(rollout_segments.iter_segment(store, key))
    assert len(batches) == 8 and [r for b in batches for r in b] == read_segment(store, key)
    assert key == segment_key(read_segment(store, key)), "the name is still the digest of the rows"
    reader = RolloutCache(tmp_path / "reader.sqlite")
    report = shared_cache.pull(store, reader)
    assert (report.segments, report.rows) == (1, 50) and all(reader.get(_key(i)) for i in range(50))
    with pytest.raises(ValueError, match="must come sorted"):
        write_segment(store, iter([(_key(2), "[]"), (_key(1), "[]")]))

    # Row 30 (the fifth row group) is damaged: the error names it; compaction takes none of that segment's rows.
    rows = [(_key(100 + i), json.dumps([])) for i in range(40)]
    rows[30] = ("not-a-key", "[]")
    bad = PREFIX + "seg-" + "d" * 32 + ".parquet"
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": [k for k, _ in rows], "completions": [p for _, p in rows]}), buf, row_group_size=7)
    store.write_bytes(bad, buf.getvalue())
    with pytest.raises(BadSegment, match=r"row 30: field 'key'"):
        read_segment(store, bad)
    _push(store, tmp_path, "b", range(50, 53))
    compacted = shared_cache.compact(store)
    assert compacted.left.keys() == {bad} and "row 30" in compacted.left[bad]
    assert (compacted.read, compacted.rows) == (2, 53)
    assert [k for k, _ in read_segment(store, compacted.key)] == [_key(i) for i in range(53)]
    report = shared_cache.pull(store, RolloutCache(tmp_path / "fresh.sqlite"))
    assert report.skipped == 1 and report.rows == 53 + 28  # rows before the damaged batch merged, each checked


def test_compaction_holds_a_batch_not_the_union(tmp_path, monkeypatch):
    """Peak memory of compacting 8 segments (43 MB of rows) stays far below the union: Python objects
    (tracemalloc; measured 1.3 MB) and Arrow buffers (a proxy pool; 0.5 MB), with row groups of 256 KiB. The
    whole-union compaction held every row as Python strings at least twice (a dict, a sorted list) plus the
    Arrow table and the file's bytes. SQLite's page cache (fixed, `storage/rollout_union.py`) is not counted."""
    import random
    import tracemalloc

    from storage import rollout_segments

    # Small row groups, so that the bound shows on data a test can afford.
    monkeypatch.setattr(rollout_segments, "ROW_GROUP_BYTES", 256 << 10)
    store = open_store(str(tmp_path / "root"))
    rng = random.Random(3)
    union = 0
    for s in range(8):
        rows = [(rng.randbytes(32).hex(),
                 json.dumps([{"text": rng.randbytes(1000).hex(), "finish_reason": "stop", "prompt_tokens": 1,
                              "completion_tokens": 1}])) for _ in range(2500)]
        union += sum(len(k) + len(p) for k, p in rows)
        write_segment(store, rows)
    assert union > 40e6

    pool = arrow_proxy_pool()  # outlives this test: see conftest
    old = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        report = shared_cache.compact(store)
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(old)
    assert (report.read, report.rows, len(list_segments(store))) == (8, 20000, 1)
    assert python < union / 16, f"Python peak {python / 1e6:.1f} MB for a {union / 1e6:.1f} MB union"
    assert pool.max_memory() < union / 16, f"Arrow peak {pool.max_memory() / 1e6:.1f} MB"
