"""Dedup and decontamination of problems before search, on a source seeded with exact and near duplicates
of GSM8K test problems (tests/fixtures/gsm8k/test.jsonl, a copy of ../shared/data/gsm8k/test.jsonl)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from storage.dedup import BenchmarkIndex, DecontamConfig, DedupConfig, decontaminate, dedup, normalize
from storage.errors import ConfigError
from tasks.filters import filter_problems, manifest_entry
from tasks.sources.files import FileSourceConfig, load_file_source

GSM8K_TEST = Path(__file__).parent / "fixtures" / "gsm8k" / "test.jsonl"


def _gsm8k(n: int, start: int = 0) -> list[str]:
    lines = GSM8K_TEST.read_text(encoding="utf-8").splitlines()[start : start + n]
    return [json.loads(line)["question"] for line in lines]


def _near(text: str) -> str:
    """A paraphrase a contaminated source would hold: one number changed, casing and spacing different."""
    changed = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), text, count=1)
    return "  " + changed.upper().replace(". ", ".   ")


@pytest.fixture
def seeded(tmp_path):
    bench = _gsm8k(10)
    other = _gsm8k(6, start=500)  # GSM8K problems not in the benchmark file below
    rows = ([{"id": f"exact-{i}", "question": q, "answer": "1"} for i, q in enumerate(bench[:3])]
            + [{"id": f"near-{i}", "question": _near(q), "answer": "1"} for i, q in enumerate(bench[3:6])]
            + [{"id": f"clean-{i}", "question": q, "answer": "1"} for i, q in enumerate(other)]
            + [{"id": "dup-exact", "question": other[0].lower() + "  ", "answer": "1"},
               {"id": "dup-near", "question": _near(other[1]), "answer": "1"}])
    src = tmp_path / "source.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in bench))
    problems = load_file_source(FileSourceConfig(path=str(src), fields={"id": "id"})).problems
    return problems, benchmark


def test_seeded_source_loses_exactly_its_copies_of_the_benchmark_and_of_itself(seeded):
    problems, benchmark = seeded
    kept, dropped = filter_problems(problems, DedupConfig(enabled=True), DecontamConfig(benchmarks=[str(benchmark)]))
    by_source_id = {p.problem_id: p.metadata["source_id"] for p in problems}
    assert [p.metadata["source_id"] for p in kept] == [f"clean-{i}" for i in range(6)]
    got = {by_source_id[d["id"]]: (d["reason"], d["match"]) for d in dropped}
    for i in range(3):
        assert got[f"exact-{i}"] == ("contaminated", f"bench.jsonl:{i + 1}")
        assert got[f"near-{i}"][0] == "contaminated" and got[f"near-{i}"][1] == f"bench.jsonl:{i + 4}"
    clean0 = next(p.problem_id for p in problems if p.metadata["source_id"] == "clean-0")
    clean1 = next(p.problem_id for p in problems if p.metadata["source_id"] == "clean-1")
    assert got["dup-exact"] == ("exact-duplicate", clean0)
    assert got["dup-near"] == ("near-duplicate", clean1)
    entry = manifest_entry(dropped)
    assert entry["by_reason"] == {"contaminated": 6, "exact-duplicate": 1, "near-duplicate": 1}
    assert all(r["question"] and r["similarity"] > 0.5 for r in entry["records"])


def test_nothing_is_dropped_when_off_or_clean(seeded):
    problems, benchmark = seeded
    kept, dropped = filter_problems(problems, DedupConfig(), DecontamConfig())
    assert kept == list(problems) and dropped == []
    other = _gsm8k(20, start=600)
    kept_ids, out = dedup([(str(i), q) for i, q in enumerate(other)], DedupConfig(enabled=True))
    assert out == [] and len(kept_ids) == 20, "distinct GSM8K problems are not near duplicates"
    index = BenchmarkIndex(DecontamConfig(benchmarks=[str(benchmark)]))
    assert decontaminate([(str(i), q) for i, q in enumerate(other)], index) == ([str(i) for i in range(20)], [])


def test_normalisation_and_clear_errors(tmp_path):
    assert normalize("  Janet’s ducks,  lay 16 EGGS! ") == "janet s ducks lay 16 eggs"
    with pytest.raises(ConfigError, match="does not exist"):
        BenchmarkIndex(DecontamConfig(benchmarks=[str(tmp_path / "missing.jsonl")]))
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"foo": "bar"}) + "\n")
    with pytest.raises(ConfigError, match=r"b.jsonl\[0\] has no text field"):
        BenchmarkIndex(DecontamConfig(benchmarks=[str(bad)]))
    assert BenchmarkIndex(DecontamConfig(benchmarks=[str(bad)], field="foo")).best_match("bar") == ("b.jsonl:1", 1.0)


def test_export_leaves_out_contaminated_and_duplicate_problems_and_lists_them(tmp_path):
    from datasets import load_dataset

    from storage.exports import run_export
    from storage.exports.base import ReleaseData
    from storage.objectstore import open_store
    from storage.schema import to_table

    bench_q, other_q = _gsm8k(1)[0], _gsm8k(1, start=700)[0]
    questions = {"pb": _near(bench_q), "pc": other_q, "pd": other_q.lower() + " "}

    def step(pid):
        return {"problem_id": pid, "solution_id": f"s-{pid}", "step_index": 0, "step_text": "x = 1", "char_start": 0,
                "char_end": 5, "mc_k": 4, "mc_c": 4, "mc_value": 1.0, "q_value": None, "advantage": None,
                "first_error_index": None, "judge_label": None, "formal_label": None, "consensus": None,
                "label_source": "mc"}

    data = ReleaseData({"dataset": "demo", "version": 1}, {
        "problems": to_table("problems", [{"problem_id": pid, "source": "s", "domain": "math", "question": q,
                                           "answer": "1", "header": None, "formal_statement": None, "metadata": "{}"}
                                          for pid, q in questions.items()]),
        "steps": to_table("steps", [step(pid) for pid in questions]),
    })
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text(json.dumps({"question": bench_q}) + "\n")
    out = tmp_path / "out"
    record = run_export(open_store(str(tmp_path / "root")), "demo", 1, "trl-prm", str(out), {}, data=data,
                        dedup=DedupConfig(enabled=True), decontaminate=DecontamConfig(benchmarks=[str(benchmark)]))
    assert record["rows"] == 1 and record["filters"]["by_reason"] == {"contaminated": 1, "exact-duplicate": 1}
    assert {(r["id"], r["reason"], r["match"]) for r in json.loads((out / "export.json").read_text())["filters"]["records"]} == {
        ("pb", "contaminated", "bench.jsonl:1"), ("pd", "exact-duplicate", "pc")}
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["prompt"] == [other_q]
