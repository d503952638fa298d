"""The data of small builds is pinned: refactoring the engine, the registries or the flow must not change
one byte of the `steps` or `pairs` tables (digests computed on main's code before issue 10's refactor
landed, with the step verifiers of issue 12 in the default build: `steps.verdicts`)."""

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
    "math-shepherd": {"steps": "d1f02f16d89f1fd3", "pairs": "06224c64e962f329"},
    "omegaprm": {"steps": "c017a2fc2454d843", "pairs": "2ecd6e64f238601f"},
    "mcts": {"steps": "93e4ff4a936dc38f", "pairs": "5de61a5c95c4b61e"},
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
