"""Releases on both stores (a local folder and moto's S3 over HTTP): concurrent commits, crashes, verify,
gc and name safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pyarrow as pa
import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.errors import ConfigError, StorageError
from storage.objectstore import LocalStore, open_store, validate_name
from storage.release import (
    commit_release,
    gc,
    latest_version,
    list_datasets,
    list_versions,
    parse_ref,
    read_manifest,
    stage_shard,
    verify_release,
)
from storage.schema import to_table


def _problems(tag: str, n: int = 3) -> pa.Table:
    return to_table("problems", [
        {"problem_id": f"{tag}-{i}", "source": "t", "domain": "math", "question": f"{tag} q{i}", "answer": str(i),
         "header": None, "formal_statement": None, "metadata": "{}"} for i in range(n)])


def _steps(tag: str, n: int = 4) -> pa.Table:
    return to_table("steps", [
        {"problem_id": f"{tag}-0", "solution_id": f"{tag}-s", "step_index": i, "step_text": f"step {i}",
         "char_start": 0, "char_end": 6, "mc_k": 4, "mc_c": i % 3, "mc_value": (i % 3) / 4, "q_value": None,
         "advantage": None, "first_error_index": None, "judge_label": None, "formal_label": None,
         "consensus": None, "label_source": "mc"} for i in range(n)])


def _stage_and_commit(store, dataset: str, build: str, shards: int = 2) -> dict:
    keys = []
    for i in range(shards):
        key = f"shard{i}"
        stage_shard(store, dataset, build, key, {"problems": _problems(f"{build}{i}"), "steps": _steps(f"{build}{i}")})
        keys.append(key)
    return commit_release(store, dataset, build_key=build, shard_keys=keys, manifest_fields={"seed": 1}, card="# card\n")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("s3_root")


def test_commit_is_visible_and_verifies(root):
    store = open_store(root)
    m = _stage_and_commit(store, "demo", "b1")
    assert m["version"] == 1 and m["row_counts"] == {"problems": 6, "nodes": 0, "steps": 8, "pairs": 0}
    assert set(m["files"]) >= {"problems/part-00000.parquet", "problems/part-00001.parquet", "nodes/part-00000.parquet", "README.md"}
    assert "commit_s" in m["timings"]
    assert list_versions(store, "demo") == [1] and list_datasets(store) == ["demo"]
    assert verify_release(store, "demo", 1) == []
    m2 = _stage_and_commit(store, "demo", "b2")
    assert m2["version"] == 2 and m2["parent_version"] == 1 and latest_version(store, "demo") == 2


def test_verify_reports_a_corrupted_a_missing_and_an_extra_file(root):
    store = open_store(root)
    _stage_and_commit(store, "demo", "b1")
    data = bytearray(store.read_bytes("demo/v1/steps/part-00000.parquet"))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes("demo/v1/steps/part-00000.parquet", bytes(data))
    store.delete("demo/v1/problems/part-00001.parquet")
    store.write_bytes("demo/v1/steps/part-99999.parquet", b"x")
    problems = verify_release(store, "demo", 1)
    assert any(p.startswith("sha256 mismatch: steps/part-00000.parquet") for p in problems)
    assert "missing: problems/part-00001.parquet" in problems
    assert "unexpected file: steps/part-99999.parquet" in problems


def _fail_manifest_writes(monkeypatch, store, exc: BaseException) -> None:
    """Make the store raise `exc` exactly where a commit writes its manifest (the last, visible step)."""
    real = type(store).create_exclusive

    def fail(self, key, data):
        if key.endswith("manifest.json"):
            raise exc
        return real(self, key, data)

    monkeypatch.setattr(type(store), "create_exclusive", fail)


def test_crash_before_the_manifest_leaves_nothing_visible_and_gc_collects_it(root, monkeypatch):
    store = open_store(root)
    _fail_manifest_writes(monkeypatch, store, KeyboardInterrupt("simulated crash"))
    with pytest.raises(KeyboardInterrupt):
        _stage_and_commit(store, "demo", "b1")
    monkeypatch.undo()
    assert list_versions(store, "demo") == [] and list_datasets(store) == []
    assert store.list("demo/v1/")  # the copied data is there but invisible
    with pytest.raises(StorageError, match="does not exist"):
        read_manifest(store, "demo", 1)
    assert gc(store, "demo", older_than_s=3600) == []  # young leftovers may belong to a running build
    removed = gc(store, "demo", older_than_s=0)
    assert "demo/v1/" in removed and "demo/_claims/v1" in removed and "demo/_staging/b1/" in removed
    assert store.list("demo/") == []
    # The number is free again and the next build commits cleanly.
    assert _stage_and_commit(store, "demo", "b2")["version"] == 1


def test_commit_refuses_a_lost_claim(root, monkeypatch):
    store = open_store(root)
    import storage.release as release

    real = release._claim_version

    def claim_then_lose(store_, dataset, build_key, *rest):
        n, token = real(store_, dataset, build_key, *rest)
        store_.write_bytes(f"{dataset}/_claims/v{n}", b'{"token": "someone-else"}')
        return n, token

    monkeypatch.setattr(release, "_claim_version", claim_then_lose)
    with pytest.raises(StorageError, match="claim on demo@v1 was lost"):
        _stage_and_commit(store, "demo", "b1")
    assert list_versions(store, "demo") == []


def _commit_in_child(root: str, build: str, start_at: float, out) -> None:
    store = open_store(root)
    for i in range(2):
        stage_shard(store, "demo", build, f"s{i}", {"problems": _problems(f"{build}{i}"), "steps": _steps(f"{build}{i}")})
    time.sleep(max(0.0, start_at - time.time()))  # both processes commit at the same moment
    m = commit_release(store, "demo", build_key=build, shard_keys=["s0", "s1"], manifest_fields={}, card="# c\n")
    out.put((build, m["version"], m["content_hash"]))


def test_two_processes_committing_at_once_get_two_distinct_intact_versions(root):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4.0  # after both children have imported and staged
    procs = [ctx.Process(target=_commit_in_child, args=(root, b, start_at, out)) for b in ("ba", "bb")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = sorted(out.get(timeout=5) for _ in procs)
    store = open_store(root)
    assert sorted(v for _, v, _ in results) == [1, 2]
    assert list_versions(store, "demo") == [1, 2]
    for build, version, content in results:
        m = read_manifest(store, "demo", version)
        assert m["content_hash"] == content and verify_release(store, "demo", version) == []
        ids = {r for r in _read_ids(store, version)}
        assert ids == {f"{build}{i}-{j}" for i in range(2) for j in range(3)}  # each version holds its own build


def _read_ids(store, version: int) -> list[str]:
    import pyarrow.parquet as pq

    ids = []
    for key in store.list(f"demo/v{version}/problems/"):
        fs, path = store.filesystem_path(key)
        ids += pq.read_table(path, filesystem=fs)["problem_id"].to_pylist()
    return ids


def test_conditional_create_has_exactly_one_winner(root):
    store = open_store(root)
    assert store.create_exclusive("demo/_claims/v7", b"a") is True
    assert store.create_exclusive("demo/_claims/v7", b"b") is False
    assert store.read_bytes("demo/_claims/v7") == b"a"


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "_staging", "a@v1", "", "a b", "x" * 200, "a\\b"])
def test_unsafe_dataset_names_are_refused(root, name):
    store = open_store(root)
    with pytest.raises(ConfigError, match="`dataset`"):
        validate_name(name)
    with pytest.raises(ConfigError):
        stage_shard(store, name, "b1", "s0", {"problems": _problems("x")})
    with pytest.raises(ConfigError):
        list_versions(store, name)


def test_keys_cannot_escape_a_local_root(tmp_path):
    store = LocalStore(tmp_path / "data")
    for key in ("../x", "/etc/passwd", "a/../../x", "a//b"):
        with pytest.raises(StorageError, match="invalid object key"):
            store.write_bytes(key, b"x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("ref,want", [("demo", ("demo", None)), ("demo@v3", ("demo", 3)), ("a-b.c@2", ("a-b.c", 2))])
def test_parse_ref(ref, want):
    assert parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["demo@v0", "demo@latest", "../x@v1", "demo@v1@v2"])
def test_parse_ref_refuses(ref):
    with pytest.raises(ConfigError):
        parse_ref(ref)


def test_manifest_is_never_overwritten(root):
    store = open_store(root)
    _stage_and_commit(store, "demo", "b1")
    before = store.read_bytes("demo/v1/manifest.json")
    assert store.create_exclusive("demo/v1/manifest.json", b"{}") is False
    assert json.loads(store.read_bytes("demo/v1/manifest.json")) == json.loads(before)


def _die_before_manifest(root: str) -> None:
    """A build process killed outright (no exception handling, no cleanup) just before the manifest."""
    import os

    store = open_store(root)
    real = type(store).create_exclusive

    def die(self, key, data):
        if key.endswith("manifest.json"):
            os._exit(9)
        return real(self, key, data)

    type(store).create_exclusive = die
    _stage_and_commit(store, "demo", "dead")


def test_a_killed_build_leaves_nothing_visible_and_the_next_commit_is_clean(root):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_die_before_manifest, args=(root,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    store = open_store(root)
    assert list_versions(store, "demo") == [] and store.list("demo/_staging/dead/")
    m = _stage_and_commit(store, "demo", "next")  # the dead build's number stays taken until gc
    assert m["version"] == 2 and list_versions(store, "demo") == [2] and verify_release(store, "demo", 2) == []
    assert sorted(gc(store, "demo", older_than_s=0)) == ["demo/_claims/v1", "demo/_staging/dead/", "demo/_staging/next/", "demo/v1/"]
    assert list_versions(store, "demo") == [2] and verify_release(store, "demo", 2) == []


def _commit_with_token(store, build: str, token: str | None) -> dict:
    return commit_release(store, "demo", build_key=build, shard_keys=["shard0"], manifest_fields={}, card="# c\n",
                          commit_token=token)


def test_a_retried_commit_returns_its_version_instead_of_claiming_the_next(root):
    store = open_store(root)
    stage_shard(store, "demo", "b1", "shard0", {"problems": _problems("b1"), "steps": _steps("b1")})
    first = _commit_with_token(store, "b1", "run-1")
    assert first["version"] == 1 and first["commit_token"] == "run-1"
    store.delete_prefix("demo/_staging/b1/")  # the first attempt got as far as cleaning up staging
    again = _commit_with_token(store, "b1", "run-1")
    assert again == first and list_versions(store, "demo") == [1]
    assert store.list("demo/_claims/") == ["demo/_claims/v1"]  # nothing new was claimed
    # The same build run again later (a new run, a new token) is a new version, not deduplicated.
    stage_shard(store, "demo", "b1", "shard0", {"problems": _problems("b1"), "steps": _steps("b1")})
    later = _commit_with_token(store, "b1", "run-2")
    assert later["version"] == 2 and later["content_hash"] == first["content_hash"]
    assert list_versions(store, "demo") == [1, 2]


def test_a_retry_after_a_crash_before_the_manifest_reuses_its_own_claim(root, monkeypatch):
    store = open_store(root)
    stage_shard(store, "demo", "b1", "shard0", {"problems": _problems("b1"), "steps": _steps("b1")})
    _fail_manifest_writes(monkeypatch, store, OSError("simulated network error"))
    with pytest.raises(OSError):
        _commit_with_token(store, "b1", "run-1")
    monkeypatch.undo()
    m = _commit_with_token(store, "b1", "run-1")
    assert m["version"] == 1 and list_versions(store, "demo") == [1] and verify_release(store, "demo", 1) == []
    # Another run does not take that claim: it belongs to run-1 only.
    stage_shard(store, "demo", "b2", "shard0", {"problems": _problems("b2"), "steps": _steps("b2")})
    assert _commit_with_token(store, "b2", "run-2")["version"] == 2


@pytest.mark.usefixtures("prefect_server")
def test_build_whose_catalog_sync_fails_once_commits_one_version(small_config, monkeypatch):
    import flows.commit as commit_module
    from flows.build import build_dataset
    from storage.catalog import Catalog
    from test_deployments import trigger_payload_fields

    real_sync = Catalog.sync
    calls = {"n": 0}

    def flaky_sync(self, store):
        calls["n"] += 1
        if calls["n"] == 1:  # after the manifest: the task fails and Prefect retries it
            raise OSError("simulated catalog failure")
        return real_sync(self, store)

    monkeypatch.setattr(Catalog, "sync", flaky_sync)
    events: list[dict] = []
    monkeypatch.setattr(commit_module, "emit_event", lambda **kw: events.append(kw))
    cfg = small_config(source={"kind": "synthetic", "num_problems": 4, "seed": 0}, shard_size=4)
    summary = build_dataset(cfg)
    store = open_store(cfg.storage.root)
    assert calls["n"] == 2 and summary["version"] == 1
    assert [e["payload"]["version"] for e in events] == [1]  # announced once, after the retry succeeded
    assert trigger_payload_fields() <= set(events[0]["payload"])  # everything publish-on-commit reads
    assert list_versions(store, "demo") == [1] and store.list("demo/_claims/") == ["demo/_claims/v1"]
    assert store.list("demo/_staging/") == []
    # Rebuilding the same config later is a new run, so a new version.
    assert build_dataset(cfg)["version"] == 2 and list_versions(store, "demo") == [1, 2]


def test_gc_walks_past_folders_that_are_not_datasets(root):
    store = open_store(root)
    _stage_and_commit(store, "demo", "b0")
    store.write_bytes("_cache/rollouts.sqlite", b"SQLite format 3\x00")  # the rollout cache of local roots
    store.write_bytes("demo/_staging/b1/s1/steps.parquet", b"leftover")
    removed = gc(store, older_than_s=0)
    assert "demo/_staging/b1/" in removed and not any(key.startswith("_cache") for key in removed)
    assert store.read_bytes("_cache/rollouts.sqlite").startswith(b"SQLite")
    assert list_versions(store, "demo") == [1]
