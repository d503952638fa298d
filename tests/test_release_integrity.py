"""What a release claims, checked: the manifest's own digest, row counts per file and per table, broken
manifests reported instead of raised, views over exactly the manifest's files, names that cannot share
a root, and the staging leases that let builds of one config run at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.catalog import Catalog, CatalogWarning
from storage.errors import BrokenReleaseError, ConfigError
from storage.lease import CLOSING, StagingLease, hold_staging, leases, release_staging
from storage.names import check_dataset_name, reserved_reason, sql_clash
from storage.objectstore import open_store
from storage.release import (
    check_release,
    commit_release,
    gc,
    manifest_digest,
    read_manifest,
    read_release,
    scan_root,
    stage_shard,
    verify_release,
)
from test_storage_release import _problems, _stage_and_commit, _steps


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("s3_root")


def _edit_manifest(store, dataset: str, version: int, edit) -> None:
    key = f"{dataset}/v{version}/manifest.json"
    m = json.loads(store.read_bytes(key))
    edit(m)
    store.write_bytes(key, json.dumps(m, indent=2).encode())


def test_the_manifest_digest_is_over_its_canonical_json(root):
    store = open_store(root)
    m = _stage_and_commit(store, "demo", "b1")
    on_disk = read_manifest(store, "demo", 1)
    assert on_disk == m and m["manifest_sha256"] == manifest_digest(on_disk)
    # Key order and whitespace are not content: a reformatted manifest keeps its digest.
    store.write_bytes("demo/v1/manifest.json", json.dumps(dict(reversed(list(on_disk.items())))).encode())
    assert check_release(store, "demo", 1).problems == []


EDITED = "manifest.json was edited after commit: its content no longer matches `manifest_sha256`"


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m["row_counts"].update(steps=m["row_counts"]["steps"] + 1),
     [EDITED, "row count mismatch: table steps (manifest row_counts 9, files 8)"]),
    (lambda m: m["files"]["steps/part-00000.parquet"].update(rows=5),
     [EDITED, "row count mismatch: steps/part-00000.parquet (manifest files[].rows 5, file 4)"]),
    (lambda m: m.update(seed=2), [EDITED]),
    (lambda m: m.update(config={"search": {"k": 99}}), [EDITED]),
])
def test_verify_detects_edited_manifest_metadata(tmp_path, edit, expected):
    store = open_store(str(tmp_path / "data"))
    _stage_and_commit(store, "demo", "b1")
    _edit_manifest(store, "demo", 1, edit)
    assert verify_release(store, "demo", 1) == expected


def test_row_counts_are_checked_from_the_files_even_without_a_digest(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _stage_and_commit(store, "demo", "b1")
    _edit_manifest(store, "demo", 1, lambda m: (m.pop("manifest_sha256"), m["row_counts"].update(problems=1)))
    check = check_release(store, "demo", 1)
    assert check.problems == ["row count mismatch: table problems (manifest row_counts 1, files 6)"]
    assert check.notes and check.notes[0].startswith("no digest")


def test_an_old_manifest_without_a_digest_is_noted_not_failed(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    store = open_store(str(tmp_path / "data"))
    _stage_and_commit(store, "demo", "b1")
    _edit_manifest(store, "demo", 1, lambda m: m.pop("manifest_sha256"))
    assert verify_release(store, "demo", 1) == []
    out = CliRunner().invoke(app, ["datasets", "--root", str(tmp_path / "data"), "verify", "demo@v1"])
    assert out.exit_code == 0, out.output
    assert "demo@v1: note: no digest" in out.output and "demo@v1: OK" in out.output


def test_verify_reports_a_truncated_parquet_file(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _stage_and_commit(store, "demo", "b1")
    path = tmp_path / "data" / "demo" / "v1" / "steps" / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:100])
    problems = verify_release(store, "demo", 1)
    assert any(p.startswith("sha256 mismatch: steps/part-00001.parquet") for p in problems)
    assert any(p.startswith("size mismatch: steps/part-00001.parquet") for p in problems)
    assert any(p.startswith("not readable as Parquet: steps/part-00001.parquet") for p in problems)
    with pytest.raises(BrokenReleaseError, match=r"demo@v1 is damaged \(size mismatch: steps/part-00001.parquet.*"
                                                 r"datasets verify demo@v1"):
        read_release(store, "demo", 1)


@pytest.mark.parametrize("damage,reason", [
    (lambda raw: raw + b"}}", "manifest.json is not valid JSON"),
    (lambda raw: b"", "manifest.json is empty"),
    (lambda raw: b"{}", "manifest.json field `dataset`: Field required (and 4 more)"),
    (lambda raw: b"[1, 2]", "manifest.json is not a JSON object"),
    (lambda raw: raw.replace(b'"version": 2', b'"version": 1'), "manifest.json describes demo@v1, not the folder it is in"),
    (lambda raw: raw.replace(b'"problems/part-00000.parquet"', b'"../../etc/passwd"'), "manifest.json lists a file outside"),
])
def test_a_broken_manifest_is_reported_by_name_and_the_rest_of_the_root_is_read(root, damage, reason):
    store = open_store(root)
    for build in ("b1", "b2", "b3"):
        _stage_and_commit(store, "demo", build)
    _stage_and_commit(store, "other", "b1")
    store.write_bytes("demo/v2/manifest.json", damage(store.read_bytes("demo/v2/manifest.json")))
    with pytest.raises(BrokenReleaseError, match="demo@v2 is damaged") as err:
        read_manifest(store, "demo", 2)
    assert err.value.reason.startswith(reason)
    assert verify_release(store, "demo", 2)[0].startswith(reason)
    scan = scan_root(store)
    assert sorted(scan.manifests) == [("demo", 1), ("demo", 3), ("other", 1)]
    (broken,) = scan.broken
    assert broken.line().startswith(f"demo@v2 is damaged and left out ({reason}")
    assert broken.line().endswith("run `stepforge datasets verify demo@v2`")
    # A later commit of the same dataset takes the next number and verifies.
    assert _stage_and_commit(store, "demo", "b4")["version"] == 4 and verify_release(store, "demo", 4) == []


def test_views_read_exactly_the_files_the_manifest_lists(root, tmp_path):
    store = open_store(root)
    _stage_and_commit(store, "demo", "b1")
    # A stray copy of a part file (a user's `cp`, a half-done sync tool) is not part of the release.
    store.copy("demo/v1/steps/part-00000.parquet", "demo/v1/steps/part-00000-copy.parquet")
    catalog = Catalog.for_store(store, str(tmp_path / "cat.duckdb"))
    with pytest.warns(CatalogWarning, match=r"demo@v1 holds files its manifest does not list.*"
                                            r"unexpected file: steps/part-00000-copy.parquet"):
        assert catalog.sync(store) == {"demo": [1]}
    _, rows = catalog.sql("SELECT count(*) FROM demo_v1_steps")
    assert rows == [(8,)], "the stray copy adds no rows"
    _, rows = catalog.sql("SELECT count(*) FROM demo_all_steps")
    assert rows == [(8,)]
    assert verify_release(store, "demo", 1) == ["unexpected file: steps/part-00000-copy.parquet"]


def test_a_missing_file_leaves_only_its_release_out_of_the_catalog(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _stage_and_commit(store, "demo", "b1")
    _stage_and_commit(store, "demo", "b2")
    store.delete("demo/v2/problems/part-00001.parquet")
    catalog = Catalog.for_store(store)
    with pytest.warns(CatalogWarning, match=r"demo@v2 is damaged and left out \(missing: problems/part-00001.parquet\)"):
        assert catalog.sync(store) == {"demo": [1]}
    _, rows = catalog.sql("SELECT count(*) FROM demo_problems")  # latest intact version
    assert rows == [(6,)]
    _, rows = catalog.sql("SELECT latest_version, versions FROM datasets")
    assert rows == [(1, 1)]


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,view", [
    ("my-data", "my_data", "my_data_steps"),
    ("my.data", "my-data", "my_data_steps"),
    ("Demo", "demo", "demo_steps"),
    ("x", "x_v1", "x_v1_steps"),
    ("x_v12", "x", "x_v12_steps"),
    ("x", "x_all", "x_all_steps"),
    ("x_v1", "x_v1_all", "x_v1_all_steps"),
    ("x", "x_v01", None),
    ("x", "xv1", None),
    ("x", "x_vv", None),
    ("demo", "demo2", None),
])
def test_sql_view_name_clashes(a, b, view):
    assert sql_clash(a, b) == view and sql_clash(b, a) == view


def test_a_name_that_collides_with_a_dataset_on_the_root_is_refused_naming_both(root):
    store = open_store(root)
    _stage_and_commit(store, "my-data", "b1")
    stage_shard(store, "wip", "b1", "s0", {"problems": _problems("w")})  # staged, not committed yet
    for name, other in [("my_data", "my-data"), ("My.Data", "my-data"), ("my-data_v2", "my-data"), ("WIP", "wip")]:
        with pytest.raises(ConfigError, match=rf"`dataset` '{name}' collides with the dataset '{other}'"):
            check_dataset_name(store, name)
    check_dataset_name(store, "my-data")  # building into the same dataset is fine
    check_dataset_name(store, "my-data2")


def test_reserved_names_and_files_on_the_root_are_refused(tmp_path):
    store = open_store(str(tmp_path / "data"))
    (tmp_path / "data" / "notes.txt").write_text("a file a user keeps here")
    with pytest.raises(ConfigError, match="notes.txt already exists and is not a dataset"):
        check_dataset_name(store, "notes.txt")
    with pytest.raises(ConfigError, match="'catalog.duckdb' is the DuckDB catalog file"):
        check_dataset_name(store, "catalog.duckdb")
    with pytest.raises(ConfigError, match="catalog file configured in `storage.catalog`"):
        check_dataset_name(store, "my.db", catalog=str(tmp_path / "data" / "my.db"))
    for name in ("_cache", "_staging", "catalog.duckdb.wal", "team.duckdb"):
        assert reserved_reason(name)


def test_config_refuses_reserved_dataset_names_with_the_reason():
    from flows.config import load_config

    for name, why in [("catalog.duckdb", "the DuckDB catalog file"), ("_cache", "the rollout cache folder"),
                      ("_staging", "staged shards")]:
        with pytest.raises(ConfigError, match=rf"`dataset`.*{why}"):
            load_config(None, [f"dataset={name}"])


# --- staging leases ---------------------------------------------------------------------------------


def test_a_commit_keeps_staging_that_another_build_holds(root):
    store = open_store(root)
    first = hold_staging(store, "demo", "b1")
    second = hold_staging(store, "demo", "b1")
    try:
        _stage_and_commit(store, "demo", "b1")
        assert release_staging(store, "demo", "b1", first.holder) is False, "the second build still holds it"
        assert store.list("demo/_staging/b1/")
        m = commit_release(store, "demo", build_key="b1", shard_keys=["shard0", "shard1"], manifest_fields={}, card="#\n")
        assert m["version"] == 2 and verify_release(store, "demo", 2) == []
        assert release_staging(store, "demo", "b1", second.holder) is True
        assert store.list("demo/_staging/") == [] and store.list("demo/_leases/") == []
    finally:
        first.close()
        second.close()


def test_a_lease_of_a_process_that_is_gone_is_dead_and_gc_respects_live_ones(tmp_path):
    store = open_store(str(tmp_path / "data"))
    stage_shard(store, "demo", "b1", "s0", {"problems": _problems("a")})
    stage_shard(store, "demo", "b2", "s0", {"problems": _problems("b")})
    # A lease taken by a process that then died (SIGKILL leaves its lease behind).
    code = ("import sys; from storage.objectstore import open_store; from storage.lease import StagingLease; "
            "StagingLease(open_store(sys.argv[1]), 'demo', 'b1').acquire()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=True)
    (dead,) = leases(store, "demo", "b1")
    assert not dead.live
    live = hold_staging(store, "demo", "b2")
    try:
        assert [lease.live for lease in leases(store, "demo", "b2")] == [True]
        removed = gc(store, "demo", older_than_s=0)
        assert "demo/_staging/b1/" in removed and not store.exists(dead.key), "the dead lease went with it"
        assert "demo/_staging/b2/" not in removed and store.list("demo/_staging/b2/"), "a live build's staging stays"
    finally:
        live.close()
    assert "demo/_staging/b2/" in gc(store, "demo", older_than_s=0)


def test_a_lease_from_another_host_lapses_after_its_ttl(tmp_path):
    store = open_store(str(tmp_path / "data"))
    store.write_bytes("demo/_leases/b1/elsewhere.json", json.dumps({"host": "other-host", "pid": 1, "ttl_s": 60}).encode())
    # Its age is read from the file's mtime, so the heartbeat is aged by moving that back instead of sleeping
    # (with a 0.5 s TTL, a pause of 0.5 s on a loaded machine between writing and listing read as lapsed).
    path = tmp_path / "data" / "demo" / "_leases" / "b1" / "elsewhere.json"
    for age, live in ((30, True), (61, False)):
        os.utime(path, (time.time() - age,) * 2)
        assert [lease.live for lease in leases(store, "demo", "b1")] == [live], f"heartbeat {age} s old"


def test_a_build_arriving_during_a_removal_waits_for_it(tmp_path):
    """The remover holds `_closing` from before its lease listing until the folder is gone; a newcomer
    that wrote its lease too late to be seen waits, so it never stages into a folder being deleted."""
    store = open_store(str(tmp_path / "data"))
    assert store.create_exclusive(f"demo/_leases/b1/{CLOSING}", b"{}")
    got: list[StagingLease] = []
    t = threading.Thread(target=lambda: got.append(hold_staging(store, "demo", "b1")))
    t.start()
    # Until its lease is there (written first), not a fixed 0.6 s: a thread slower than that to start on a
    # loaded machine failed the lease check; then two more of its polls of `_closing` (0.2 s each).
    deadline = time.monotonic() + 30
    while not leases(store, "demo", "b1") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [lease.live for lease in leases(store, "demo", "b1")] == [True], "its lease is written first"
    time.sleep(0.5)
    assert not got, "the newcomer must wait while the removal runs"
    store.delete(f"demo/_leases/b1/{CLOSING}")
    t.join(5)
    assert got
    got[0].close()
    # And a remover that finds a live lease leaves the folder alone.
    stage_shard(store, "demo", "b1", "s0", {"steps": _steps("a")})
    with hold_staging(store, "demo", "b1"):
        assert release_staging(store, "demo", "b1", None) is False
        assert store.list("demo/_staging/b1/")
    assert release_staging(store, "demo", "b1", None) is True
