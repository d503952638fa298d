"""The corruption matrix: one kind of damage at a time on one release of a root holding three datasets.
`datasets verify` names the damage; `list`, `show`, `sql`, `diff`, `export` and `gc` work for everything
else with one warning line about the damaged release (never a traceback); a new build commits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.build import build_dataset
from flows.cli import app
from storage.objectstore import open_store
from storage.release import list_versions, read_manifest, verify_release

pytestmark = pytest.mark.usefixtures("prefect_server")

DATASETS = ("alpha", "beta", "gamma")
PART = "beta/v1/steps/part-00000.parquet"


def _config(root: Path, dataset: str):
    from flows.config import BuildConfig

    return BuildConfig.model_validate({
        "dataset": dataset, "storage": {"root": str(root)}, "shard_size": 4,
        "source": {"kind": "synthetic", "num_problems": 8, "seed": 0},
        "search": {"algorithm": "math-shepherd", "num_solutions": 2, "k": 4}})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, prefect_server) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "data"
    for ds in DATASETS:
        build_dataset(_config(root, ds))
    return root


def _append(path: Path, data: bytes) -> None:
    path.write_bytes(path.read_bytes() + data)


DAMAGE = {
    "manifest-junk-appended": (lambda r: _append(r / "beta/v1/manifest.json", b"}}"), "manifest.json is not valid JSON"),
    "manifest-empty": (lambda r: (r / "beta/v1/manifest.json").write_bytes(b""), "manifest.json is empty"),
    "manifest-empty-object": (lambda r: (r / "beta/v1/manifest.json").write_bytes(b"{}"), "manifest.json field `dataset`"),
    "file-missing": (lambda r: (r / PART).unlink(), "missing: steps/part-00000.parquet"),
    "file-extra": (lambda r: shutil.copy(r / PART, r / "beta/v1/steps/part-00000 (1).parquet"),
                   "unexpected file: steps/part-00000 (1).parquet"),
    "parquet-truncated": (lambda r: (r / PART).write_bytes((r / PART).read_bytes()[:200]),
                          "size mismatch: steps/part-00000.parquet"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_one_damaged_release_never_breaks_the_root(pristine, tmp_path, kind):
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    damage, problem = DAMAGE[kind]
    damage(root)
    left_out = kind != "file-extra"  # an unlisted file is ignored by every reader, so beta@v1 stays usable
    runner = CliRunner()
    ds = ["datasets", "--root", str(root)]

    def cli(*args: str, code: int = 0) -> str:
        out = runner.invoke(app, [*ds, *args])
        assert out.exit_code == code, (args, out.output)
        assert "Traceback" not in out.output, out.output
        return out.output

    # verify names the damage, in one line per problem.
    out = cli("verify", "beta@v1", code=1)
    assert f"beta@v1: {problem}" in out
    for other in ("alpha@v1", "gamma@v1"):
        assert f"{other}: OK" in cli("verify", other)

    # list: the others as usual, the damaged release as one warning line naming verify.
    out = cli("list")
    assert "alpha" in out and "gamma" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: beta@v1"))
    assert warning.endswith("run `stepforge datasets verify beta@v1`") and problem.split(":")[0] in warning

    # show: the others work; the damaged one (when its data cannot be served) is one error line.
    assert "alpha@v1" in cli("show", "alpha@v1") and "gamma@v1" in cli("show", "gamma")
    if left_out:
        out = cli("show", "beta@v1", code=2)
        assert out.strip().splitlines()[-1].startswith("error: beta@v1 is damaged") and "datasets verify beta@v1" in out
    else:
        assert "beta@v1" in cli("show", "beta@v1")

    # sql over every other dataset, with the damaged release reported once.
    steps = {d: read_manifest(open_store(str(root)), d, 1)["row_counts"]["steps"] for d in ("alpha", "gamma")}
    out = cli("sql", "--json", "SELECT (SELECT count(*) FROM alpha_v1_steps) AS a, (SELECT count(*) FROM gamma_steps) AS g")
    assert f'[{{"a": {steps["alpha"]}, "g": {steps["gamma"]}}}]' in out
    assert sum(line.startswith("warning: beta@v1") for line in out.splitlines()) == 1
    out = cli("sql", "--json", "SELECT count(*) AS n FROM versions WHERE dataset = 'beta'")
    assert f'[{{"n": {0 if left_out else 1}}}]' in out
    if not left_out:  # the stray copy of a part file adds no rows: views read the manifest's files
        beta = read_manifest(open_store(str(root)), "beta", 1)["row_counts"]["steps"]
        assert f'[{{"n": {beta}}}]' in cli("sql", "--json", "SELECT count(*) AS n FROM beta_v1_steps")

    # diff, export and gc on the rest.
    assert "problems rows" in cli("diff", "alpha@v1", "gamma@v1")
    assert "exported alpha@v1" in cli("export", "alpha@v1", "--format", "trl-prm", "--out", str(tmp_path / "out"))
    cli("gc", "--older-than", "0")
    assert (root / "beta/v1/manifest.json").exists(), "gc never removes a visible release, damaged or not"

    # A new build of the damaged dataset, and of another, commit normally.
    store = open_store(str(root))
    assert build_dataset(_config(root, "beta"))["version"] == 2
    assert build_dataset(_config(root, "alpha"))["version"] == 2
    assert verify_release(store, "beta", 2) == [] and list_versions(store, "beta") == [1, 2]
    out = cli("sql", "--json", "SELECT count(*) AS n FROM beta_v2_steps")
    assert '"n": 0' not in out and '[{"n": ' in out


def test_a_colliding_name_is_refused_before_any_work_by_the_cli_and_the_flow(pristine, tmp_path):
    from storage.errors import ConfigError

    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for name, message in [("Alpha", "`dataset` 'Alpha' collides with the dataset 'alpha' already under"),
                          ("gamma_v1", "'gamma_v1' collides with the dataset 'gamma'"),
                          ("catalog.duckdb", "`dataset`: 'catalog.duckdb' is the DuckDB catalog file")]:
        out = CliRunner().invoke(app, ["build", "--set", f"storage.root={root}", "--set", f"dataset={name}"])
        text = " ".join(out.output.split())  # rich wraps long lines at the terminal width
        assert out.exit_code == 2, out.output
        assert message in text and "Traceback" not in text and text.startswith("error:"), out.output
    # A deployment runs the flow without the CLI: the flow refuses it too, before touching the root.
    with pytest.raises(ConfigError, match="'beta_all' collides with the dataset 'beta'.*'beta_all_steps'"):
        build_dataset(_config(root, "beta_all"))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing was written"
