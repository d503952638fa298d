"""Formal labels inside `stepforge build` (the `formal` section): every solution of the synthetic problems is
formalised by the simulated prover and checked whole by a Lean backend, through the real Prefect flow.

The Lean backends are the stand-ins (a checker of a stated fragment, not Lean): the REPL stand-in as a pool
of processes over stdio, and the Kimina stand-in over HTTP. Checked: labels against the synthetic oracle
(the first mistake -1, steps before it +1, later masked), the same labels over both transports, the same
content hash twice, Lean verdicts in `steps.verdicts` that the consensus rules read, the Lean slots' global
concurrency limit, and timeouts/crashes recorded as `timeout`/`error`, never `invalid`."""

from __future__ import annotations

import sys
from collections import defaultdict

import pyarrow.dataset as pads
import pytest

from flows.build import build_dataset
from storage.errors import ConfigError
from tasks.sources.synthetic import first_error, parse_question
from verifiers.lean.testing.kimina_server import KiminaStandin, KiminaStandinConfig

pytestmark = pytest.mark.usefixtures("prefect_server")

STANDIN_REPL = [sys.executable, "-m", "verifiers.lean.testing.repl_server"]


def _repl(**changes) -> dict:
    return {"enabled": True, "lean": {"kind": "repl", "command": STANDIN_REPL, "max_repls": 2, "max_repl_mem_mb": 2048,
                                      "timeout_s": 30, "header_timeout_s": 30, **changes}}


def _kimina(url: str, **changes) -> dict:
    return {"enabled": True, "lean": {"kind": "kimina", "base_url": url, "backoff_initial_s": 0.01, **changes}}


def _solutions(root, dataset: str = "demo", version: int = 1) -> tuple[dict, dict[str, list[dict]]]:
    def table(name: str) -> list[dict]:
        return pads.dataset(str(root / dataset / f"v{version}" / name), format="parquet").to_table().to_pylist()

    specs = {p["problem_id"]: parse_question(p["question"])[0] for p in table("problems")}
    by_solution: dict[str, list[dict]] = defaultdict(list)
    for row in table("steps"):
        by_solution[row["solution_id"]].append(row)
    for rows in by_solution.values():
        rows.sort(key=lambda r: r["step_index"])
    return specs, dict(by_solution)


def _oracle(spec, rows) -> list[bool | None]:
    fe = first_error(spec, [r["step_text"] for r in rows])
    n = len(rows)
    return [True] * n if fe is None else [True] * fe + [False] + [None] * (n - fe - 1)


def _lean(row) -> dict:
    (v,) = [v for v in row["verdicts"] if v["verifier"] == "lean"]
    return v


def _flow_run_parameters(run_name: str) -> str:
    """The parameters the Prefect server stored for the latest `build_dataset` run of that name, as JSON."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert runs, run_name
    return json.dumps(runs[0].parameters)


def test_formal_labels_in_the_build_match_the_oracle(small_config, tmp_path, monkeypatch):
    from flows.build import build_run_name

    # A credential the REPL needs lives in the build process's environment, which the REPL inherits; the
    # wrapper refuses to start the stand-in without it (every verdict would then be an error, not the oracle's).
    monkeypatch.setenv("STEPFORGE_REPL_TOKEN", "not-for-prefect-7f3a")
    check = ['sh', '-c', 'test -n "$STEPFORGE_REPL_TOKEN" && test -n "$SF_MODE" || exit 3; exec "$0" "$@"',
             *STANDIN_REPL]
    cfg = small_config(source={"num_problems": 24, "seed": 4}, policy={"kind": "simulated", "step_error_rate": 0.3},
                       formal=_repl(command=check, env={"SF_MODE": "plain-9c2e"}))
    summary = build_dataset(cfg)
    # The manifest keeps the names of the REPL's extra environment only, and the secret reaches neither it
    # nor the flow-run parameters the Prefect server stored.
    manifest = next((tmp_path / "data" / "demo" / "v1").glob("manifest*.json")).read_text()
    assert "SF_MODE" in manifest and "plain-9c2e" not in manifest and "not-for-prefect-7f3a" not in manifest
    params = _flow_run_parameters(build_run_name(cfg))
    assert "SF_MODE" in params and "not-for-prefect-7f3a" not in params
    specs, by_solution = _solutions(tmp_path / "data")
    wrong = 0
    for rows in by_solution.values():
        spec = specs[rows[0]["problem_id"]]
        want = _oracle(spec, rows)
        assert [r["formal_label"] for r in rows] == want
        wrong += False in want
        # The Lean verdicts come after the step checks and the judge, and say the same as the label.
        assert [v["verifier"] for v in rows[0]["verdicts"]] == ["arith-check", "judge", "lean"]
        statuses = [_lean(r)["status"] for r in rows]
        assert statuses == ["valid" if x else "invalid" if x is False else "none" for x in want]
        assert all(_lean(r)["version"] == "lean-repl/repl-json-1" for r in rows)
    n = len(by_solution)  # 2 per problem, less the solutions two samples share
    assert n > 40 and 5 <= wrong < n
    counts = summary["step_verdicts"]
    assert counts["lean-solutions/invalid"] == wrong and counts["lean-solutions/valid"] == n - wrong
    assert counts["lean/invalid"] == wrong

    # The consensus rules read Lean's opinion: `mc-and-formal` keeps exactly the solutions on which MC's first
    # error (k rollouts can all fail after a good step) is Lean's, which on this domain is the oracle's.
    agree = 0
    for rows in by_solution.values():
        lean_first = next((i for i, x in enumerate(_oracle(specs[rows[0]["problem_id"]], rows)) if x is False), None)
        agree += rows[0]["first_error_index"] == lean_first
    from storage.exports import EXPORTERS, parse_options
    from storage.exports.base import load_release
    from storage.objectstore import open_store

    data = load_release(open_store(str(tmp_path / "data")), "demo", 1)
    report = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"consensus": "mc-and-formal"})).stats["consensus"]
    assert report["total"] == n and report["kept"] == agree and report["dropped"] == {"disagree": n - agree}, report


def test_same_labels_over_http_and_the_same_content_hash_twice(small_config, tmp_path):
    kw = dict(source={"num_problems": 12, "seed": 7}, policy={"kind": "simulated", "step_error_rate": 0.35})
    first = build_dataset(small_config(dataset="replone", formal=_repl(), **kw))
    again = build_dataset(small_config(dataset="repltwo", formal=_repl(max_repls=1), **kw))
    # Pool limits are not content: the same data, so the same hash (and the same build key).
    assert first["content_hash"] == again["content_hash"]
    with KiminaStandin(KiminaStandinConfig(max_repls=2)) as srv:
        over_http = build_dataset(small_config(dataset="kimina", formal=_kimina(srv.url, batch_size=3), **kw))
        assert srv.requests > 0
    labels = {}
    for name in ("replone", "kimina"):
        _, by_solution = _solutions(tmp_path / "data", name)
        labels[name] = {sid: [r["formal_label"] for r in rows] for sid, rows in by_solution.items()}
    assert labels["replone"] == labels["kimina"]
    assert any(False in ls for ls in labels["kimina"].values())
    assert over_http["step_verdicts"]["lean-solutions/invalid"] == first["step_verdicts"]["lean-solutions/invalid"]


def test_formal_off_is_the_default_and_leaves_the_build_as_it_was(small_config):
    cfg = small_config()
    assert cfg.formal.enabled is False
    on = small_config(formal=_repl())
    assert on.build_key() != cfg.build_key()  # what Lean decides is content once it is on
    # Off, the section is not part of the key, whatever it holds (a build keeps its key and its resumable staging).
    off_with_settings = small_config(formal={**_repl(), "enabled": False})
    assert off_with_settings.build_key() == cfg.build_key()


def test_lean_slots_hold_a_prefect_global_concurrency_limit(small_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="stepforge-test-lean", limit=1))
    # Each Lean batch takes a while and the server has room for several at once: only the limit keeps them apart.
    with KiminaStandin(KiminaStandinConfig(max_repls=8, cost_ms=40)) as srv:
        summary = build_dataset(small_config(source={"num_problems": 16, "seed": 1},
                                             concurrency={"shards": 2, "lean_slots": "stepforge-test-lean"},
                                             formal=_kimina(srv.url)))
        assert srv.requests >= 16 and srv.peak_in_flight == 1, "one slot: one Lean batch at a time"
    assert summary["step_verdicts"]["lean-solutions/valid"] > 0
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("stepforge-test-lean").active_slots == 0

    with pytest.raises(ConfigError, match="`concurrency.lean_slots`.*prefect gcl create"):
        build_dataset(small_config(dataset="other", concurrency={"lean_slots": "no-such-lean-limit"},
                                   formal=_repl()))


def test_timeouts_and_crashes_are_recorded_as_such_never_as_invalid(small_config, tmp_path):
    # A REPL that hangs on some commands and dies on others: the pool kills and replaces it.
    faulty = _repl(command=[*STANDIN_REPL, "--hang-rate", "0.15", "--crash-rate", "0.15", "--seed", "3"],
                   timeout_s=1.5, crash_retries=0, max_repls=4)
    summary = build_dataset(small_config(source={"num_problems": 16, "seed": 9},
                                         policy={"kind": "simulated", "step_error_rate": 0.3}, formal=faulty))
    specs, by_solution = _solutions(tmp_path / "data")
    undecided = 0
    for rows in by_solution.values():
        statuses = {_lean(r)["status"] for r in rows}
        if statuses & {"timeout", "error"}:
            undecided += 1
            assert len(statuses) == 1, statuses  # the whole proof was not judged: no step is
            assert all(r["formal_label"] is None for r in rows)
        else:
            assert [r["formal_label"] for r in rows] == _oracle(specs[rows[0]["problem_id"]], rows)
    counts = summary["step_verdicts"]
    assert counts.get("lean-solutions/timeout", 0) > 0 and counts.get("lean-solutions/error", 0) > 0, counts
    assert undecided == counts["lean-solutions/timeout"] + counts["lean-solutions/error"]


def test_a_formal_domain_build_through_the_flow(small_config, tmp_path):
    """`source.kind=synthetic-lean` through the real flow: tactic steps, MC from Lean-checked completions,
    formal labels, the Lean problem columns filled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="stepforge-test-lean-mc", limit=1))
    # The rollouts' proofs go to a Kimina server, one request per engine batch, each holding a Lean slot.
    with KiminaStandin(KiminaStandinConfig(max_repls=8, cost_ms=5)) as srv:
        summary = build_dataset(small_config(
            source={"kind": "synthetic-lean", "num_problems": 8, "seed": 3},
            policy={"kind": "simulated-prover", "step_error_rate": 0.3},
            verifier={"kind": "lean", "lean": {"kind": "kimina", "base_url": srv.url, "batch_size": 1024}},
            # Adaptive MC: a prefix's rollouts come in chunks, one engine round each, so each shard sends
            # several batches (the probe goes out with the solutions: plain MC is only two rounds deep).
            search={"algorithm": "math-shepherd", "num_solutions": 2, "k": 4, "adaptive": True, "adaptive_chunk": 1},
            concurrency={"shards": 2, "lean_slots": "stepforge-test-lean-mc"},
            judge={"enabled": False}, checks=[], formal=_repl(), pairs={"formal": {"enabled": True}}))
        assert srv.requests > 2 and srv.peak_in_flight == 1
    root = tmp_path / "data" / "demo" / "v1"
    problems = pads.dataset(str(root / "problems"), format="parquet").to_table().to_pylist()
    assert all(p["domain"] == "lean" and p["header"] == "import Mathlib" and p["formal_statement"] == p["question"]
               for p in problems)
    steps = pads.dataset(str(root / "steps"), format="parquet").to_table().to_pylist()
    assert all(s["step_text"].startswith(("have h", "exact h")) for s in steps)
    assert {s["formal_label"] for s in steps} >= {True, False}
    # Lean's first error and MC's agree on this clean domain wherever MC saw the wrong step at all.
    for s in steps:
        if s["formal_label"] is False and s["mc_k"]:
            assert s["mc_c"] == 0
    assert summary["step_verdicts"]["lean-solutions/invalid"] > 0
    # Lean-verified step-DPO pairs land in the pairs table and export as Step-DPO rows.
    pairs = pads.dataset(str(root / "pairs"), format="parquet").to_table().to_pylist()
    formal = [p for p in pairs if p["kind"] == "formal"]
    assert formal and all(p["rejected"].startswith("have h") for p in formal)
    from storage.exports import EXPORTERS, parse_options
    from storage.exports.base import load_release
    from storage.objectstore import open_store

    data = load_release(open_store(str(tmp_path / "data")), "demo", 1)
    rows = EXPORTERS["step-dpo"].fn(data, parse_options("step-dpo", {"kinds": ["formal"]})).table
    assert rows.num_rows == len(formal)


def test_tactic_mode_labels_like_whole_proofs_and_is_repl_only(small_config, tmp_path):
    kw = dict(source={"num_problems": 10, "seed": 8}, policy={"kind": "simulated", "step_error_rate": 0.35},
              judge={"enabled": False})
    summary = build_dataset(small_config(dataset="tactic", formal={**_repl(), "mode": "tactic"}, **kw))
    whole = build_dataset(small_config(dataset="whole", formal=_repl(), **kw))
    specs, by_solution = _solutions(tmp_path / "data", "tactic")
    _, whole_solutions = _solutions(tmp_path / "data", "whole")
    for sid, rows in by_solution.items():
        assert [r["formal_label"] for r in rows] == _oracle(specs[rows[0]["problem_id"]], rows)
        assert [r["formal_label"] for r in rows] == [r["formal_label"] for r in whole_solutions[sid]]
    counts = summary["step_verdicts"]
    # Every judged proof ran tactic by tactic too, and its first failing tactic is command mode's first error.
    assert counts["lean-tactic/agree"] == len(by_solution) and "lean-tactic/disagree" not in counts
    assert "lean-tactic/agree" not in whole["step_verdicts"]
    from flows.config import load_config

    with pytest.raises(ConfigError, match="needs a backend with a tactic mode") as exc:
        load_config(None, ["formal.enabled=true", "formal.mode=tactic", "formal.lean.kind=kimina"])
    assert exc.value.field == "formal.mode"


@pytest.mark.parametrize("section", ["formal.lean.env", "verifier.lean.env"])
@pytest.mark.parametrize("env", [{"HF_TOKEN": "plainvalue-q8"}, {"LEAN_OPTS": "sk-proj-abcdefghijklmn"},
                                 {"CACHE": "https://user:pw@cache.example/lean"}])
def test_secrets_in_the_repl_env_are_refused_before_prefect_sees_them(section, env):
    from flows.config import load_config

    sets = ["formal.enabled=true"] if section.startswith("formal") else [
        "source.kind=synthetic-lean", "policy.kind=simulated-prover", "verifier.kind=lean", "checks=[]",
        "judge.enabled=false"]
    (name, value), = env.items()
    with pytest.raises(ConfigError) as err:
        load_config(None, [*sets, f"{section}={{{name}: '{value}'}}"])
    assert err.value.field == section and name in str(err.value) and value not in str(err.value)
    assert "environment" in str(err.value)
