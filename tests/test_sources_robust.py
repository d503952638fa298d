"""Every file source ends any input in problems, quarantined records (with locator and field) or one
SourceError naming a `source.*` field, never another exception: fixed cases from issue 11 and
property-based fuzzing (hypothesis) of JSONL, JSON, CSV and Parquet files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import SourceError
from storage.schema import to_table
from tasks.sources.base import FieldMapping, SourceResult
from tasks.sources.files import FileSourceConfig, load_file_source
from tasks.sources.gsm8k import GSM8KSourceConfig, load_gsm8k
from tasks.sources.hf import HFSourceConfig, load_hf_source

GOOD = {"question": "What is 2 + 3?", "answer": "5"}


def _write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def _stored(result: SourceResult) -> None:
    """What the build does with a source's output must work: problem rows become Parquet, quarantine rows
    go into the manifest (UTF-8 JSON)."""
    table = to_table("problems", [p.to_row() for p in result.problems])
    pq.write_table(table, io.BytesIO())
    json.dumps([q.to_row() for q in result.quarantined], ensure_ascii=False).encode("utf-8")


def test_a_lone_surrogate_is_quarantined_with_its_line_and_field(tmp_path):
    # Valid JSON, invalid Unicode: json.loads gives a str that no UTF-8 encoder takes (it used to fail the
    # whole build in problem_id).
    path = _write_jsonl(tmp_path / "q.jsonl", [
        r'{"question": "\ud800 x", "answer": "1"}',
        json.dumps(GOOD),
        r'{"question": "What is 1 + 1?", "answer": "2 \udfff"}',
        r'{"question": "What is 3 + 3?", "answer": "6", "note": {"deep": ["\udc80"]}}',
    ])
    fields = FieldMapping(metadata=["note"])
    result = load_file_source(FileSourceConfig(path=str(path), fields=fields))
    assert [p.question for p in result.problems] == [GOOD["question"]]
    got = [(q.record, q.field) for q in result.quarantined]
    assert got == [("q.jsonl:line 1", "question"), ("q.jsonl:line 3", "answer"), ("q.jsonl:line 4", "note")]
    assert "not valid Unicode" in result.quarantined[0].reason and "'\\ud800'" in result.quarantined[0].reason
    _stored(result)
    # The same through the GSM8K loader (the file source with GSM8K answers).
    gsm = _write_jsonl(tmp_path / "g.jsonl", [r'{"question": "\ud800", "answer": "x\n#### 3"}',
                                              json.dumps({"question": "Q?", "answer": "a\n#### 4"})])
    result = load_gsm8k(GSM8KSourceConfig(path=str(gsm)))
    assert len(result.problems) == 1 and [(q.record, q.field) for q in result.quarantined] == [("g.jsonl:line 1", "question")]


def test_lines_json_cannot_take_are_quarantined_and_a_bom_is_form(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # a BOM before the first record
        '{"question": "Q?", "answer": ' + "9" * 5000 + "}",  # an integer too long for int()
        "[" * 100_000 + "]" * 100_000,  # nesting too deep for the parser
        b'{"question": "\xff"}',  # not UTF-8
    ])
    result = load_file_source(FileSourceConfig(path=str(path)))
    assert [p.question for p in result.problems] == [GOOD["question"]]
    assert [q.record for q in result.quarantined] == ["q.jsonl:line 2", "q.jsonl:line 3", "q.jsonl:line 4"]
    assert all("not valid JSON" in q.reason for q in result.quarantined)
    _stored(result)


def test_a_json_array_file_is_a_source_and_anything_else_is_one_error(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([GOOD, {"question": "\ud800"}, 7], ensure_ascii=True))
    result = load_file_source(FileSourceConfig(path=str(path)))
    assert len(result.problems) == 1
    assert [(q.record, q.field) for q in result.quarantined] == [("q.json:record 1", "question"), ("q.json:record 2", None)]
    for text, why in [('{"question": "Q"}', "not an array"), ('[{"question": ', "not valid JSON")]:
        path.write_text(text)
        with pytest.raises(SourceError, match=why) as info:
            load_file_source(FileSourceConfig(path=str(path)))
        assert info.value.field == "source.path" and "\n" not in str(info.value)


def test_csv_rows_over_the_size_limit_or_with_bad_bytes_cost_only_themselves(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes("\ufeffquestion,answer\n".encode() + b"Q1?,1\n" + b"x" * 200_000 + b",2\n"
                     + b"Q3 \xff?,3\n" + b"Q4?,4\n")
    result = load_file_source(FileSourceConfig(path=str(path)))
    assert [p.question for p in result.problems] == ["Q1?", "Q4?"]
    assert [(q.record, q.field) for q in result.quarantined] == [("q.csv:row 1", None), ("q.csv:row 2", "question")]
    _stored(result)


def test_parquet_strings_that_are_not_utf8_are_quarantined_per_row(tmp_path):
    path = tmp_path / "q.parquet"
    # `view` skips UTF-8 validation: a writer in another language can leave such bytes in a string column.
    question = pa.array([b"Q1?", b"\xff\xfe", b"Q3?"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"question": question, "answer": ["1", "2", "3"]}), path)
    result = load_file_source(FileSourceConfig(path=str(path)))
    assert [p.question for p in result.problems] == ["Q1?", "Q3?"]
    assert [(q.record, q.field) for q in result.quarantined] == [("q.parquet:row 1", "question")]
    _stored(result)


def test_hf_source_quarantines_what_it_cannot_store(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"question": "Q2?", "answer": "x"}) + "\n")
    result = load_hf_source(HFSourceConfig(path=str(path), split="train", fields=FieldMapping(metadata=["missing"])))
    assert len(result.problems) == 2 and not result.quarantined
    _stored(result)


# -- fuzzing ---------------------------------------------------------------------------------------------
# Text as sources hold it: anything Unicode allows, lone surrogates (JSON \udXXX escapes), NULs, markup-like
# brackets, numbers as strings.
_weird = st.sampled_from(["\ud800", "\udfff tail", "\x00", "[/b]", "#### 12", "\ufeff", "  ", "NaN", "1e999",
                          "\u202e", "Step 1:", "\r\n"])
_text = st.one_of(st.text(max_size=30), _weird, st.lists(_weird | st.text(max_size=5), max_size=4).map("".join))
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _text)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=6)
_record = st.dictionaries(st.sampled_from(["question", "answer", "id", "meta", "other"]) | _text, _value, max_size=5)
_records = st.lists(st.one_of(_record, _value), max_size=8)
_mapping = st.builds(FieldMapping, question=st.sampled_from(["question", "other"]),
                     answer=st.sampled_from(["answer", None]), id=st.sampled_from(["id", None]),
                     metadata=st.sampled_from([[], ["meta"], ["meta", "missing"]]))
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


def _check(cfg: FileSourceConfig, n_records: int | None) -> None:
    """The property: problems + quarantined + duplicates account for every record, and both can be
    stored; or one SourceError naming a `source.*` field on one line."""
    try:
        result = load_file_source(cfg)
    except SourceError as exc:
        assert exc.field and exc.field.startswith("source.") and "\n" not in str(exc)
        return
    if n_records is not None:
        assert len(result.problems) + len(result.quarantined) + result.duplicates == n_records
    for q in result.quarantined:
        assert q.record.startswith(Path(cfg.path).name + ":")
    _stored(result)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str, allow_nan=True))


@_FUZZ
@given(records=_records, mapping=_mapping, answer_format=st.sampled_from(["plain", "gsm8k"]),
       junk=st.lists(st.binary(max_size=20), max_size=2))
def test_fuzz_jsonl(tmp_path_factory, records, mapping, answer_format, junk):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    # ensure_ascii writes lone surrogates as \udXXX escapes: valid JSON a reader decodes to invalid text.
    lines = [json.dumps(r, default=str, ensure_ascii=True).encode() for r in records]
    lines += [j.replace(b"\n", b" ").replace(b"\r", b" ") for j in junk if j.strip()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    n = sum(1 for ln in lines if ln.strip() and ln.decode("utf-8", "replace").strip())
    _check(FileSourceConfig(path=str(path), fields=mapping, answer_format=answer_format), n)


@_FUZZ
@given(records=_records, mapping=_mapping)
def test_fuzz_json(tmp_path_factory, records, mapping):
    path = tmp_path_factory.mktemp("fuzz") / "f.json"
    path.write_text(json.dumps(records, default=str, ensure_ascii=True))
    _check(FileSourceConfig(path=str(path), fields=mapping), len(records))


@_FUZZ
@given(rows=st.lists(st.lists(_text, min_size=0, max_size=4), max_size=8), mapping=_mapping)
def test_fuzz_csv(tmp_path_factory, rows, mapping):
    path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["question", "answer", "id", "meta"])
    writer.writerows(rows)
    # surrogatepass writes lone surrogates as the (invalid) UTF-8 bytes an encoder in another tool might.
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass"))
    _check(FileSourceConfig(path=str(path), fields=mapping), None)


@_FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"question": st.one_of(st.none(), st.binary(max_size=8), _text),
                                            "answer": st.one_of(st.none(), st.integers(), _text)}), max_size=8),
       mapping=_mapping)
def test_fuzz_parquet(tmp_path_factory, rows, mapping):
    path = tmp_path_factory.mktemp("fuzz") / "f.parquet"
    # Bytes as a string column (invalid UTF-8 possible), everything else as its text.
    def column(name):
        return [None if r[name] is None else r[name] if isinstance(r[name], bytes)
                else str(r[name]).encode("utf-8", "surrogatepass") for r in rows]

    table = pa.table({name: pa.array(column(name), pa.binary()).view(pa.string()) for name in ("question", "answer")})
    pq.write_table(table, path)
    _check(FileSourceConfig(path=str(path), fields=mapping), len(rows))


def test_lean_sources_quarantine_what_they_cannot_store(tmp_path):
    from tasks.sources.lean import (LeanDojoBenchmarkSourceConfig, MiniF2FSourceConfig, load_leandojo_benchmark,
                                    load_minif2f)

    stmt = {"name": "a", "split": "test", "header": "import Mathlib", "formal_statement": "theorem a : 1 = 1 := by"}
    path = _write_jsonl(tmp_path / "m.jsonl", [json.dumps({**stmt, "header": "import Mathlib\ud800"}),
                                               json.dumps({**stmt, "name": "b", "formal_statement": "theorem b : 2 = 2 := by"})])
    result = load_minif2f(MiniF2FSourceConfig(path=str(path)))
    assert len(result.problems) == 1 and [(q.record, q.field) for q in result.quarantined] == [("m.jsonl:line 1", "header")]
    _stored(result)
    theorem = {"full_name": "t", "file_path": "T.lean",
               "traced_tactics": [{"tactic": "simp", "state_before": "⊢ 1 = 1", "state_after": "no goals"}]}
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps([theorem, {**theorem, "full_name": "u\udfff"}], ensure_ascii=True))
    result = load_leandojo_benchmark(LeanDojoBenchmarkSourceConfig(path=str(bench)))
    assert len(result.problems) == 1 and [(q.record, q.field) for q in result.quarantined] == [("b.json[1]", "question")]
    _stored(result)
