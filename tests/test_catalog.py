"""The DuckDB catalog: datasets/versions/builds tables, per-version, latest and all-versions views, view
name collisions, and the same SQL over S3 (httpfs, moto over HTTP)."""

from __future__ import annotations

import duckdb
import pytest

from s3_fixtures import FAKE_SECRET, moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.catalog import Catalog
from storage.errors import StorageError
from storage.objectstore import open_store
from storage.release import commit_release, stage_shard
from test_exports import _pairs, _problems, _steps


def _commit(store, dataset="demo", build="b1"):
    stage_shard(store, dataset, build, "s0", {"problems": _problems(), "steps": _steps(), "pairs": _pairs()})
    return commit_release(store, dataset, build_key=build, shard_keys=["s0"], card="# c\n",
                          manifest_fields={"seed": 3, "code_version": "0.1.0+gabc", "policy": "sim", "algorithm": "math-shepherd",
                                           "config": {"seed": 3}, "timings": {"shards_s": 1.5}})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    root = str(tmp_path / "data") if request.param == "local" else request.getfixturevalue("s3_root")
    return open_store(root)


def test_catalog_registers_versions_builds_and_views(store, tmp_path):
    _commit(store, build="b1")
    _commit(store, build="b2")
    cat = Catalog.for_store(store, str(tmp_path / "cat.duckdb"))
    assert cat.sync(store) == {"demo": [1, 2]}
    _, rows = cat.sql("SELECT name, latest_version, versions FROM datasets")
    assert rows == [("demo", 2, 2)]
    _, rows = cat.sql("SELECT version, parent_version, json_extract(row_counts, '$.steps')::INT FROM versions ORDER BY version")
    assert rows == [(1, None, 6), (2, 1, 6)]
    _, rows = cat.sql("SELECT version, build_key, seed, code_version, policy, algorithm, json_extract(timings, '$.shards_s')::DOUBLE, "
                      "json_extract(timings, '$.commit_s') IS NOT NULL FROM builds ORDER BY version")
    assert rows == [(1, "b1", 3, "0.1.0+gabc", "sim", "math-shepherd", 1.5, True), (2, "b2", 3, "0.1.0+gabc", "sim", "math-shepherd", 1.5, True)]
    _, rows = cat.sql("SELECT count(*) FROM demo_v1_steps")
    assert rows == [(6,)]
    _, rows = cat.sql("SELECT version, count(*) FROM demo_all_steps GROUP BY version ORDER BY version")
    assert rows == [(1, 6), (2, 6)]
    _, rows = cat.sql("SELECT kind, count(*) FROM demo_pairs GROUP BY kind ORDER BY kind")
    assert rows == [("first_error", 1), ("sibling", 2)]
    # Any SQL works, including joins across tables and versions.
    _, rows = cat.sql("SELECT count(*) FROM demo_v1_steps s JOIN demo_v2_problems p USING (problem_id)")
    assert rows == [(6,)]
    with pytest.raises(StorageError, match="query failed"):
        cat.sql("SELECT * FROM demo_v9_steps")
    assert FAKE_SECRET.encode() not in (tmp_path / "cat.duckdb").read_bytes()


def test_a_root_already_holding_colliding_names_keeps_syncing(tmp_path):
    """New colliding names are refused before a build (storage.names); a root that already holds a pair
    (made before that check existed) keeps the first dataset's views and reports the other, instead of
    failing every later sync and so every later build."""
    from storage.catalog import CatalogWarning

    store = open_store(str(tmp_path / "data"))
    _commit(store, "a-b")
    _commit(store, "a_b")
    _commit(store, "other")
    catalog = Catalog.for_store(store)
    with pytest.warns(CatalogWarning, match="datasets 'a-b' and 'a_b' map to the same SQL view names; 'a_b' has no views"):
        assert catalog.sync(store) == {"a-b": [1], "other": [1]}
    assert catalog.collisions == [("a_b", "a-b")]
    _, rows = catalog.sql("SELECT (SELECT count(*) FROM a_b_v1_steps), (SELECT count(*) FROM other_steps)")
    assert rows == [(6, 6)]


def test_an_older_catalog_layout_is_rebuilt(tmp_path):
    store = open_store(str(tmp_path / "data"))
    _commit(store)
    path = tmp_path / "data" / "catalog.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE builds (dataset VARCHAR, version INTEGER)")  # the old, narrower layout
    con.close()
    cat = Catalog.for_store(store)
    cat.sync(store)
    _, rows = cat.sql("SELECT algorithm FROM builds")
    assert rows == [("math-shepherd",)]


def test_an_unreadable_file_of_one_version_leaves_only_its_views_out(tmp_path):
    from storage.catalog import CatalogWarning

    store = open_store(str(tmp_path / "data"))
    _commit(store, build="b1")
    _commit(store, build="b2")
    part = tmp_path / "data" / "demo" / "v1" / "steps" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")  # footer gone
    catalog = Catalog.for_store(store)
    with pytest.warns(CatalogWarning, match=r"demo@v1 steps.*datasets verify demo@v1"):
        assert catalog.sync(store) == {"demo": [1, 2]}
    assert catalog.skipped == [("demo", 1, "steps")]
    _, rows = catalog.sql("SELECT count(*) FROM demo_v2_steps")
    assert rows[0][0] > 0
    _, rows = catalog.sql("SELECT DISTINCT version FROM demo_all_steps")
    assert rows == [(2,)]
    _, rows = catalog.sql("SELECT version FROM versions ORDER BY 1")
    assert rows == [(1,), (2,)], "the version is still registered, only its unreadable table has no view"


def test_a_store_that_fails_to_answer_fails_the_sync_instead_of_dropping_views(tmp_path, monkeypatch):
    from storage.catalog import _unreadable_files

    assert _unreadable_files(duckdb.InvalidInputException("No magic bytes found at end of file"))
    assert _unreadable_files(duckdb.IOException('No files found that match the pattern "x/*.parquet"'))
    assert not _unreadable_files(duckdb.HTTPException("HTTP 503 Service Unavailable"))
    assert not _unreadable_files(duckdb.IOException("Permission denied"))
