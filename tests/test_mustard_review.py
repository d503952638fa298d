"""Fixes from the review of the MUSTARD-style flow, each tested where it would have been caught: only a
config without a `lean` section gets the stand-in, and its releases never read as Lean-verified; the
build key holds the templates' text and no machine path; a template that does not compile fails the
preflight; a concept split across shards is refused; an author that answers fewer requests than it was
sent is an error naming the seed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from flows.mustard_config import (MustardConfig, checker_name, load_mustard_config, make_checker,
                                  standin_repl_command, verify_mustard)
from storage.errors import ConfigError


def test_only_an_absent_lean_section_is_the_standin_and_it_is_named_so() -> None:
    assert checker_name(MustardConfig()) == "lean-standin"
    # A REPL section without a command is the real REPL's default, as in a build, never the stand-in.
    for overrides in (["lean.kind=repl"], ["lean.timeout_s=5"], ["lean.cwd=/tmp"]):
        cfg = load_mustard_config(None, overrides)
        assert cfg.lean.kind == "repl" and cfg.lean.command == ["lake", "env", "repl"], overrides
        assert checker_name(cfg) == "lean-repl"
    explicit = MustardConfig(lean={"kind": "repl", "command": [*standin_repl_command(), "--seed", "3"]})
    assert checker_name(explicit) == "lean-standin"
    checker = make_checker(explicit)
    try:
        assert checker.name == "lean-standin"  # the name every verdict in the rows carries
    finally:
        asyncio.run(checker.aclose())


def test_card_of_a_standin_release_says_it_is_not_lean() -> None:
    from flows.mustard import render_card

    base = {"dataset": "m", "version": 1, "row_counts": {"mustard": 3}, "config": {"max_revisions": 2},
            "stats": {"seeds": 4, "passed": 3, "failed": {"invalid": 1}}}
    standin = render_card({**base, "verifier": "lean-standin"})
    assert "Lean-verified" not in standin and "checked by the stand-in, not Lean" in standin
    real = render_card({**base, "verifier": "lean-repl"})
    assert real.startswith("# m v1\n\nLean-verified") and "stand-in" not in real
    assert "first 1,000 are listed" in real and "all" in real


def test_build_key_and_manifest_hold_no_machine_path(tmp_path: Path) -> None:
    from flows.mustard import manifest_config

    here = MustardConfig()
    elsewhere = MustardConfig(lean={"kind": "repl", "command": ["/other/python3", "-m", "verifiers.lean.testing.repl_server"],
                                    "max_repls": 2})
    assert here.build_key() == elsewhere.build_key()
    assert MustardConfig(lean={"kind": "repl", "command": [*standin_repl_command(), "--seed", "1"]}).build_key() \
        != here.build_key()  # the stand-in's own arguments change what it answers
    recorded = manifest_config(here)
    assert sys.executable not in str(recorded) and recorded["lean"]["command"][:2] == ["python", "-m"]


def test_build_key_follows_the_template_text(tmp_path: Path) -> None:
    from tasks.prompt import load_template

    tpl = tmp_path / "author.jinja"
    tpl.write_text(load_template("mustard-author"))
    cfg = MustardConfig(author_template=str(tpl))
    before = cfg.build_key()
    assert before == MustardConfig(author_template=str(tpl)).build_key()
    tpl.write_text(load_template("mustard-author") + "\nBe brief.\n")
    assert cfg.build_key() != before, "an edited template must not resume the shards of the old one"


def test_a_template_that_does_not_compile_fails_the_preflight(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("Concept: {{ concept }\n{% if level %}no endif\n")
    for field in ("author_template", "revise_template"):
        with pytest.raises(ConfigError, match=f"`{field}`.*does not compile") as caught:
            verify_mustard(MustardConfig(**{field: str(bad)}))
        assert caught.value.field == field


def test_a_concept_split_across_shards_is_refused() -> None:
    with pytest.raises(ConfigError, match="`samples_per_concept`.*`shard_size`"):
        load_mustard_config(None, ["samples_per_concept=8", "shard_size=4"])
    assert load_mustard_config(None, ["samples_per_concept=4", "shard_size=4"]).shard_size == 4


def test_an_author_that_drops_answers_is_an_error_naming_the_seed() -> None:
    from tasks.mustard.concepts import expand_seeds, load_concepts
    from tasks.mustard.pipeline import LoopSettings, run_mustard
    from tasks.policy.simulated_author import SimulatedAuthor, SimulatedAuthorConfig
    from tasks.prompt import load_template

    class Short(SimulatedAuthor):
        async def generate(self, requests):  # noqa: ANN001, ANN201
            return (await super().generate(requests))[:-1]  # the last request gets no answer

    class NeverCalled:
        name, version = "x", "1"

        async def check(self, items):  # noqa: ANN001, ANN201
            raise AssertionError("nothing reaches Lean when an answer is missing")

    seeds = expand_seeds(load_concepts(), 2)[:4]
    settings = LoopSettings(0, 0.7, 2048, "import Mathlib", 0, load_template("mustard-author"),
                            load_template("mustard-revise"))
    with pytest.raises(RuntimeError, match=f"3 answers for 4 requests.*{seeds[-1].seed_id!r}"):
        asyncio.run(run_mustard(seeds, Short(SimulatedAuthorConfig()), NeverCalled(), settings))


def test_mustard_cli_quiets_only_the_console_and_says_a_commit_before_a_lost_api_is_done(prefect_server,
                                                                                       tmp_path: Path,
                                                                                       monkeypatch) -> None:
    import os

    import httpx
    from typer.testing import CliRunner

    import flows.mustard as mustard_module
    from flows.cli import app

    real = mustard_module.mustard_dataset
    seen: dict[str, str | None] = {}

    def commits_then_loses_the_api(cfg):  # noqa: ANN001, ANN202
        seen.update(level=os.environ.get("PREFECT_LOGGING_LEVEL"),
                    console=os.environ.get("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"))
        real(cfg)
        raise httpx.ConnectError("connection refused", request=httpx.Request("GET", "http://127.0.0.1:9/api/flow_runs/x"))

    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", raising=False)
    monkeypatch.setattr(mustard_module, "mustard_dataset", commits_then_loses_the_api)
    result = CliRunner().invoke(app, ["mustard", "--set", "levels=[higher education]", "--set", "samples_per_concept=1",
                                      "--set", f"storage.root={tmp_path}", "--set", "dataset=lost.api"])
    assert seen == {"level": None, "console": "WARNING"}, "run logs must still reach the API"
    assert result.exit_code == 1
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error:") and "lost.api v1 was committed" in last and "do not rerun" in last, result.output


def test_a_progress_artifact_that_cannot_be_updated_is_logged_once(prefect_server, monkeypatch, caplog) -> None:
    from prefect import flow

    import flows.commit as commit_module
    from flows.commit import ProgressArtifact

    def down(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("API down")

    @flow
    def polls() -> None:
        artifact = ProgressArtifact("review-progress", "test")
        monkeypatch.setattr(commit_module, "update_progress_artifact", down)
        for percent in (10.0, 20.0, 30.0, 40.0):
            artifact.update(percent)

    with caplog.at_level("WARNING"):
        polls()
    assert sum("progress artifact not updated" in r.getMessage() for r in caplog.records) == 1


def test_mustard_preflight_checks_lean_like_a_build(monkeypatch) -> None:
    # A real REPL whose command cannot start, and a Kimina key not set: refused before any work, with the
    # same words as a build's `formal.lean`, naming mustard's `lean` section.
    with pytest.raises(ConfigError, match="`lean.command`: cannot find 'no-such-lake'") as caught:
        verify_mustard(load_mustard_config(None, ["lean.command=[no-such-lake, env, repl]"]))
    assert caught.value.field == "lean.command"
    monkeypatch.delenv("STEPFORGE_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="`lean.api_key_env` names 'STEPFORGE_TEST_NO_SUCH_KEY'") as caught:
        verify_mustard(load_mustard_config(None, ["lean.kind=kimina", "lean.api_key_env=STEPFORGE_TEST_NO_SUCH_KEY"]))
    assert caught.value.field == "lean.api_key_env"
    assert verify_mustard(MustardConfig()) == 72  # the stand-in's command (this Python) starts


def test_the_standins_seeded_faults_depend_only_on_the_seed_and_the_command() -> None:
    import random

    from verifiers.lean.testing.repl_server import ReplFaults, random_fault

    texts = [f"theorem t{i} : {i} + 1 = {i + 1} := by norm_num" for i in range(200)]
    faults = ReplFaults(hang_rate=0.2, crash_rate=0.2, seed=7)
    # Another process (its own rng state, the commands in another order) draws the same faults.
    first = {t: random_fault(faults, t, random.Random(1)) for t in texts}
    other = {t: random_fault(faults, t, random.Random(2)) for t in reversed(texts)}
    assert first == other
    assert {"hang", "crash", None} == set(first.values())
    reseeded = {t: random_fault(ReplFaults(hang_rate=0.2, crash_rate=0.2, seed=8), t, random.Random(1)) for t in texts}
    assert reseeded != first


def test_a_build_card_says_when_the_standin_checked_its_lean_sections() -> None:
    from flows.summary import render_card

    base = {"dataset": "d", "version": 1, "row_counts": {"steps": 1}, "algorithm": "mc", "policy": "p", "seed": 0}
    standin = {"kind": "repl", "command": standin_repl_command()}
    card = render_card({**base, "config": {"formal": {"enabled": True, "lean": standin},
                                           "verifier": {"kind": "lean", "lean": standin}}})
    assert "`formal.lean`: checked by the stand-in, not Lean" in card
    assert "`verifier.lean`: checked by the stand-in, not Lean" in card
    real = {"kind": "repl", "command": ["lake", "env", "repl"]}
    assert "stand-in" not in render_card({**base, "config": {"formal": {"enabled": True, "lean": real}}})
    assert "stand-in" not in render_card({**base, "config": {"formal": {"enabled": False, "lean": standin}}})
