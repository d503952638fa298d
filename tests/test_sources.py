"""Problem sources: GSM8K on the real test set, files with field mappings, quarantine, HF datasets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import SourceError
from tasks.sources.base import FieldMapping
from tasks.sources.files import FileSourceConfig, load_file_source
from tasks.sources.answers import calculator_annotations, parse_gsm8k_answer
from tasks.sources.gsm8k import GSM8KSourceConfig, load_gsm8k
from tasks.sources.hf import HFSourceConfig, load_hf_source
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic, parse_question

from conftest import FIXTURES

GSM8K_TEST = FIXTURES / "gsm8k" / "test.jsonl"


def test_gsm8k_parses_all_1319_test_problems_with_their_gold_answers():
    result = load_gsm8k(GSM8KSourceConfig(path=str(GSM8K_TEST)))
    raw = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert len(result.problems) == 1319 and not result.quarantined and result.duplicates == 0
    for problem, record in zip(result.problems, raw):
        # The gold is the text after "#### " with thousands separators removed, nothing else.
        expected = record["answer"].split("####")[-1].strip().replace(",", "")
        assert problem.answer == expected
        assert problem.question == record["question"].strip()
        assert problem.source == "gsm8k"
        assert problem.metadata["reference_steps"], "reference steps are kept"
        assert all("<<" not in s for s in problem.metadata["reference_steps"])
    by_q = {p.question: p for p in result.problems}
    janet = next(q for q in by_q if q.startswith("Janet’s ducks"))
    assert by_q[janet].answer == "18"
    assert ["16-3-4", "9"] in by_q[janet].metadata["calculator"]


def test_gsm8k_answer_parsing_edge_cases():
    assert parse_gsm8k_answer("a\nb <<2*3=6>>6\n#### 1,234") == ("1234", ["a", "b 6"])
    assert parse_gsm8k_answer("#### -5")[0] == "-5"
    assert calculator_annotations("x <<48/2=24>>24 and <<24+48=72>>72") == [("48/2", "24"), ("24+48", "72")]
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer("no final line")
    with pytest.raises(ValueError, match="not a number"):
        parse_gsm8k_answer("steps\n#### seventy")


def _bad_jsonl(path):
    lines = [
        json.dumps({"question": "What is 2 + 3?", "answer": "5"}),
        "{not json",
        json.dumps({"question": "", "answer": "1"}),
        json.dumps({"answer": "7"}),
        json.dumps({"question": "What is 4 * 4?", "answer": None}),
        json.dumps({"question": 12, "answer": "3"}),
        json.dumps(["a", "list"]),
        json.dumps({"question": "What is 2 + 3?", "answer": "5"}),  # duplicate of line 1
        json.dumps({"question": "What is 9 - 4?", "answer": 5, "id": "q9", "level": 2}),
    ]
    path.write_text("\n".join(lines) + "\n")


def test_malformed_records_are_quarantined_with_record_and_field(tmp_path):
    path = tmp_path / "probs.jsonl"
    _bad_jsonl(path)
    cfg = FileSourceConfig(path=str(path), fields=FieldMapping(id="id", metadata=["level"]))
    result = load_file_source(cfg)
    assert [p.question for p in result.problems] == ["What is 2 + 3?", "What is 9 - 4?"]
    assert result.problems[1].answer == "5"
    assert result.problems[1].metadata == {"source_id": "q9", "level": 2}
    assert result.duplicates == 1
    reasons = {q.record: q for q in result.quarantined}
    assert set(reasons) == {f"probs.jsonl:line {n}" for n in (2, 3, 4, 5, 6, 7)}
    assert "not valid JSON" in reasons["probs.jsonl:line 2"].reason
    assert reasons["probs.jsonl:line 3"].field == "question" and "empty" in reasons["probs.jsonl:line 3"].reason
    assert reasons["probs.jsonl:line 4"].field == "question" and "missing" in reasons["probs.jsonl:line 4"].reason
    assert reasons["probs.jsonl:line 5"].field == "answer"
    assert "must be a string" in reasons["probs.jsonl:line 6"].reason
    assert all(q.raw for q in result.quarantined), "the raw record is kept for inspection"


def test_csv_and_parquet_with_a_field_mapping(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,gold\nHow many?,4\n,5\nAnd now?,\n")
    result = load_file_source(FileSourceConfig(path=str(csv_path), fields=FieldMapping(question="prompt", answer="gold")))
    assert [(p.question, p.answer) for p in result.problems] == [("How many?", "4")]
    assert {q.record for q in result.quarantined} == {"p.csv:row 1", "p.csv:row 2"}

    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["A?", "B?", None], "solution": ["x\n#### 3", "#### 1,000", "#### 2"]}), pq_path)
    result = load_file_source(FileSourceConfig(path=str(pq_path), fields=FieldMapping(question="problem", answer="solution"),
                                               answer_format="gsm8k"))
    assert [(p.question, p.answer) for p in result.problems] == [("A?", "3"), ("B?", "1000")]
    assert result.quarantined[0].record == "p.parquet:row 2" and result.quarantined[0].field == "problem"


def test_unreadable_source_or_wrong_mapping_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_file_source(FileSourceConfig(path=str(tmp_path / "missing.jsonl")))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("q,a\nx,1\n")
    with pytest.raises(SourceError) as info:
        load_file_source(FileSourceConfig(path=str(csv_path)))
    assert info.value.field == "source.fields.question" and "['q', 'a']" in str(info.value)
    with pytest.raises(SourceError, match="suffix"):
        load_file_source(FileSourceConfig(path=str(tmp_path / "p.txt")))


def test_hf_source_reads_a_local_datasets_folder(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"question": ["One?", "Two?", "  "], "answer": ["#### 1", "#### 2", "#### 3"]})})
    ds.save_to_disk(str(tmp_path / "hfds"))
    result = load_hf_source(HFSourceConfig(path=str(tmp_path / "hfds"), split="test", answer_format="gsm8k"))
    assert [(p.question, p.answer) for p in result.problems] == [("One?", "1"), ("Two?", "2")]
    assert result.quarantined[0].record == "hfds[test]:row 2"
    with pytest.raises(SourceError, match="no column"):
        load_hf_source(HFSourceConfig(path=str(tmp_path / "hfds"), fields=FieldMapping(question="prompt")))


def test_synthetic_source_is_deterministic_and_parseable():
    a = load_synthetic(SyntheticSourceConfig(num_problems=50, seed=3))
    b = load_synthetic(SyntheticSourceConfig(num_problems=50, seed=3))
    c = load_synthetic(SyntheticSourceConfig(num_problems=50, seed=4))
    assert [p.problem_id for p in a.problems] == [p.problem_id for p in b.problems]
    assert [p.problem_id for p in a.problems] != [p.problem_id for p in c.problems]
    assert len({p.problem_id for p in a.problems}) == 50
    for p in a.problems:
        spec, _ = parse_question(p.question)
        assert str(spec.answer) == p.answer
        assert 3 <= len(spec.ops) <= 8 and len(p.metadata["reference_steps"]) == len(spec.ops)


def test_an_undecodable_csv_row_is_quarantined_not_fatal(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"question,answer\nWhat is 1?,1\n\xff\xfe bad,2\nWhat is 3?,3\n")
    result = load_file_source(FileSourceConfig(path=str(path)))
    assert [(p.question, p.answer) for p in result.problems] == [("What is 1?", "1"), ("What is 3?", "3")]
    (bad,) = result.quarantined
    assert bad.record == "p.csv:row 1" and bad.field == "question" and "not valid UTF-8" in bad.reason
