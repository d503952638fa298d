"""`ObjectStore.open_write`: an object streamed in pieces appears whole and atomically, with the sha256 and size
of what was written, on a local folder and on S3 (moto, real multipart uploads); an interrupted write leaves
nothing visible (no object, no temp file in listings, no pending multipart upload)."""

from __future__ import annotations

import hashlib
import os

import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage import objectstore
from storage.objectstore import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    return open_store(request.getfixturevalue("s3_root"))


@pytest.fixture
def small_parts(monkeypatch):
    """64 KiB parts, and moto told to accept them (its server runs in this process): S3 wants ≥ 5 MiB."""
    import moto.s3.models

    monkeypatch.setattr(objectstore, "_PART_BYTES", 64 << 10)
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 64 << 10)


def _pieces(total: int, step: int) -> list[bytes]:
    data = os.urandom(total)
    return [data[i: i + step] for i in range(0, total, step)]


@pytest.mark.parametrize("total,step", [(0, 1), (10, 3), (300_000, 7_777)])
def test_streamed_object_equals_its_pieces(store, small_parts, total, step):
    # 300 kB in 64 KiB parts: a 5-part upload.
    pieces = _pieces(total, step) or [b""]
    with store.open_write("a/b/obj.bin") as w:
        for p in pieces:
            w.write(p)
        assert w.tell() == total
    body = b"".join(pieces)
    assert store.read_bytes("a/b/obj.bin") == body
    assert (w.sha256, w.size) == (hashlib.sha256(body).hexdigest(), total) == store.sha256("a/b/obj.bin")
    assert store.list("a/") == ["a/b/obj.bin"]


def test_real_part_sizes_on_moto(s3_root):
    """S3's own part rule (≥ 5 MiB but the last), as moto enforces it: 11 MiB go up as 8 + 3 MiB."""
    store = open_store(s3_root)
    pieces = _pieces(11 << 20, 1 << 20)
    with store.open_write("big.bin") as w:
        for p in pieces:
            w.write(p)
    assert store.sha256("big.bin") == (hashlib.sha256(b"".join(pieces)).hexdigest(), 11 << 20)
    head = store._client.head_object(Bucket=store.bucket, Key=store._k("big.bin"))
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object of 2 parts


def test_part_size_grows_so_the_part_limit_is_never_reached(monkeypatch):
    monkeypatch.setattr(objectstore, "_PART_BYTES", 10)
    monkeypatch.setattr(objectstore, "_PARTS_PER_SIZE", 2)
    sent: list[int] = []
    up = objectstore._MultipartUpload(None, "b", "k")
    up._send = lambda body: (sent.append(len(body)), up._parts.append({}))  # type: ignore[method-assign]
    up.add(memoryview(b"x" * 200))
    assert sent == [10, 10, 20, 20, 40, 40]


@pytest.mark.parametrize("total", [10, 300_000])
def test_interrupted_write_leaves_nothing(store, small_parts, total):
    store.write_bytes("x/old.bin", b"old")
    for key in ("x/new.bin", "x/old.bin"):
        with pytest.raises(RuntimeError, match="stop"):
            with store.open_write(key) as w:
                for p in _pieces(total, 50_000):
                    w.write(p)
                raise RuntimeError("stop")
    assert store.list("x/") == ["x/old.bin"]
    assert store.read_bytes("x/old.bin") == b"old"
    if store.is_remote:  # the multipart upload was aborted, not left pending
        assert not store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")
    else:
        assert os.listdir(os.path.join(store.root, "x")) == ["old.bin"]


def test_pyarrow_writes_through_it(store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": list(range(1000)), "s": [str(i) for i in range(1000)]})
    with store.open_write("t.parquet") as w:
        pq.write_table(table, w, compression="zstd")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    assert store.read_bytes("t.parquet") == sink.getvalue().to_pybytes()
