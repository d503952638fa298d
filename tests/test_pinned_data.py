"""The data of small builds is pinned: refactoring the engine, the registries or the flow must not change
one byte of the `steps` or `pairs` tables (digests computed on the code before issue 10's refactor)."""

from __future__ import annotations

import hashlib

import pytest

from flows.build import build_dataset
from flows.config import BuildConfig
from storage.objectstore import open_store
from storage.release import read_manifest

pytestmark = pytest.mark.usefixtures("prefect_server")

# sha256 over the sorted (file, sha256) list of each table of the release.
PINNED = {
    "math-shepherd": {"steps": "3033d25291ff761d", "pairs": "06224c64e962f329"},
    "omegaprm": {"steps": "24435fc2c5d0ccdf", "pairs": "2ecd6e64f238601f"},
    "mcts": {"steps": "d2c431dff9edac39", "pairs": "5de61a5c95c4b61e"},
}


def table_digest(manifest: dict, table: str) -> str:
    files = sorted((k, v["sha256"]) for k, v in manifest["files"].items() if k.startswith(f"{table}/"))
    assert files, f"release has no {table} files"
    return hashlib.sha256(repr(files).encode()).hexdigest()[:16]


@pytest.mark.parametrize("algorithm", sorted(PINNED))
def test_small_default_build_tables_are_byte_identical_to_pinned(algorithm, tmp_path):
    # The defaults of every section (search, policy, prompt, verifier, shard size), fewer problems.
    cfg = BuildConfig.model_validate({"source": {"num_problems": 32}, "search": {"algorithm": algorithm},
                                      "storage": {"root": str(tmp_path)}, "rollout_cache": False})
    build_dataset(cfg)
    manifest = read_manifest(open_store(str(tmp_path)), "demo", 1)
    got = {t: table_digest(manifest, t) for t in ("steps", "pairs")}
    print(algorithm, got)
    assert got == PINNED[algorithm]
