"""Step verifiers in the build: `steps.verdicts` and `steps.judge_label` filled by the arithmetic check, the
code check and the simulated judge, checked against the synthetic oracle; the judge over the stand-in HTTP
server labels like in-process; a judge server that dies fails the shard clearly and a rerun resumes."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

import pyarrow.dataset as pads
import pytest

from flows.build import build_dataset
from storage.errors import PolicyError
from tasks.testing.standin_server import StandinServer, StandinServerConfig
from tasks.sources.synthetic import apply_op, first_error, parse_question, parse_step

pytestmark = pytest.mark.usefixtures("prefect_server")

JUDGE_MODEL = "sim-judge"


def _table(root, dataset: str, version: int, name: str) -> list[dict]:
    return pads.dataset(str(root / dataset / f"v{version}" / name), format="parquet").to_table().to_pylist()


def _solutions(root, version: int = 1) -> tuple[dict, dict[str, list[dict]]]:
    specs = {p["problem_id"]: parse_question(p["question"])[0] for p in _table(root, "demo", version, "problems")}
    by_solution: dict[str, list[dict]] = defaultdict(list)
    for row in _table(root, "demo", version, "steps"):
        by_solution[row["solution_id"]].append(row)
    for rows in by_solution.values():
        rows.sort(key=lambda r: r["step_index"])
    return specs, by_solution


def _http_judge(url: str, **changes) -> dict:
    return {"policy": {"kind": "openai", "base_url": url, "model": JUDGE_MODEL, "api_key_env": None,
                       "timeout_s": 2.0, "backoff_initial_s": 0.01, "backoff_max_s": 0.05, **changes}}


def test_default_build_fills_verdicts_and_judge_labels_against_the_oracle(small_config, tmp_path):
    summary = build_dataset(small_config(source={"num_problems": 40, "seed": 5},
                                         policy={"kind": "simulated", "step_error_rate": 0.3}))
    specs, by_solution = _solutions(tmp_path / "data")
    exact = judged = slips = caught = 0
    for rows in by_solution.values():
        spec = specs[rows[0]["problem_id"]]
        fe = first_error(spec, [r["step_text"] for r in rows])
        truth = -1 if fe is None else fe
        for r in rows:
            names = [v["verifier"] for v in r["verdicts"]]
            assert names == ["arith-check", "judge"], names
            arith = r["verdicts"][0]
            if fe is not None and r["step_index"] > fe:
                continue  # past the first error, values may be fractions the policy writes rounded
            p = parse_step(r["step_text"])
            slip = p is not None and abs(apply_op(p.a, p.op, p.x) - p.c) > Fraction(1, 100)
            assert (arith["status"] == "invalid") == slip, r["step_text"]
            slips += slip
            caught += slip and arith["status"] == "invalid"
        # The judge's label follows its own verdicts: +1 before its first error, -1 at it, null after.
        statuses = [r["verdicts"][1]["status"] for r in rows]
        labels = [r["judge_label"] for r in rows]
        if "error" in statuses:
            assert labels == [None] * len(rows)
            continue
        judged += 1
        said = statuses.index("invalid") if "invalid" in statuses else -1
        assert labels == [True if said == -1 or i < said else False if i == said else None
                          for i in range(len(rows))]
        exact += said == truth
    assert slips > 10 and caught == slips
    assert judged == len(by_solution) and 0.65 <= exact / judged <= 0.95, (exact, judged)
    counts = summary["step_verdicts"]
    assert counts["arith-check/invalid"] > 0 and counts["judge/invalid"] > 0


def test_judge_over_http_labels_like_in_process(small_config, tmp_path):
    kw = dict(source={"num_problems": 16, "seed": 2}, judge={"votes": 3, "temperature": 0.7})
    local = build_dataset(small_config(**kw))
    with StandinServer(StandinServerConfig(judge_model=JUDGE_MODEL)) as srv:
        remote = build_dataset(small_config(**{**kw, "judge": {**kw["judge"], **_http_judge(srv.base_url)}}))
        assert srv.stats.answered > 0
    assert (local["version"], remote["version"]) == (1, 2)

    def verdicts(version):
        # The judge's version names its backend (simulated in-process vs the HTTP model): all else equal.
        return sorted((r["solution_id"], r["step_index"], r["judge_label"],
                       tuple((v["verifier"], v["status"], v["score"], v["detail"]) for v in r["verdicts"]))
                      for r in _table(tmp_path / "data", "demo", version, "steps"))

    assert verdicts(1) == verdicts(2)


def test_dead_judge_server_fails_the_shard_clearly_and_the_rerun_resumes(small_config):
    kw = dict(source={"num_problems": 24, "seed": 4}, concurrency={"shards": 1}, shard_size=8)
    with StandinServer(StandinServerConfig(judge_model=JUDGE_MODEL)) as srv:
        reference = build_dataset(small_config(**kw, judge=_http_judge(srv.base_url)))
        per_shard = srv.stats.answered // 3
    crash = StandinServer(StandinServerConfig(judge_model=JUDGE_MODEL, die_after=int(per_shard * 1.5)))
    crash.start()
    try:
        with pytest.raises(PolicyError, match="judge") as info:
            build_dataset(small_config(**kw, judge=_http_judge(crash.base_url, max_retries=1, breaker_threshold=2)))
        assert "resume" in str(info.value)
    finally:
        crash.stop()
    with StandinServer(StandinServerConfig(judge_model=JUDGE_MODEL)) as srv:
        rerun = build_dataset(small_config(**kw, judge=_http_judge(srv.base_url)))
    assert rerun["shards_resumed"] >= 1 and rerun["content_hash"] == reference["content_hash"]


def test_code_steps_in_the_build(small_config, tmp_path):
    build_dataset(small_config(source={"num_problems": 8, "seed": 1},
                               policy={"kind": "simulated", "step_error_rate": 0.4, "code_steps": True},
                               checks=[{"kind": "arith-check"}, {"kind": "code-check"}], judge={"enabled": False}))
    _, by_solution = _solutions(tmp_path / "data")
    statuses = set()
    for rows in by_solution.values():
        for r in rows:
            names = [v["verifier"] for v in r["verdicts"]]
            assert names == ["arith-check", "code-check"] and r["judge_label"] is None
            arith, code = r["verdicts"]
            # Both see the same slip: a stated result that does not follow from the written operands.
            if arith["status"] in ("valid", "invalid"):
                assert code["status"] == arith["status"], (r["step_text"], arith, code)
            statuses.add(code["status"])
    assert {"valid", "invalid"} <= statuses


def test_code_steps_over_http_check_like_in_process(small_config, tmp_path):
    """The stand-in server serves the code-step format: a build through it (the OpenAI backend) writes the same
    code-augmented steps as the in-process policy, and the code check gives them the same verdicts."""
    kw = dict(source={"num_problems": 8, "seed": 1}, checks=[{"kind": "arith-check"}, {"kind": "code-check"}],
              judge={"enabled": False})
    build_dataset(small_config(**kw, policy={"kind": "simulated", "step_error_rate": 0.4, "code_steps": True}))
    with StandinServer(StandinServerConfig(step_error_rate=0.4, code_steps=True)) as srv:
        build_dataset(small_config(**kw, policy={"kind": "openai", "base_url": srv.base_url, "model": "simulated-arith",
                                                 "api_key_env": None, "timeout_s": 10.0}))
        assert srv.stats.answered > 0

    def steps(version):
        return sorted((r["solution_id"], r["step_index"], r["step_text"], r["mc_k"], r["mc_c"],
                       tuple((v["verifier"], v["version"], v["status"], v["detail"]) for v in r["verdicts"]))
                      for r in _table(tmp_path / "data", "demo", version, "steps"))

    local, remote = steps(1), steps(2)
    assert local == remote
    code = [dict((v[0], v[2]) for v in row[5])["code-check"] for row in remote]
    assert all("<code>print(" in row[2] for row in remote), "every step carries its code"
    assert {"valid", "invalid"} <= set(code), "the code check ran on the served steps and caught slips"
