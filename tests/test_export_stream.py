"""The streaming step exports (`trl-prm`, `math-shepherd`, `prm800k`) write byte-identical Parquet and JSONL, and
the same stats and warnings, as the whole-table exporters they replaced (frozen in tests/export_reference.py):
on the export tests' fixture, on a committed release of several shard files (which are sorted each, not
together), on unsorted in-memory tables, and on random tables (hypothesis), with batches small enough that
solutions straddle batch boundaries."""

from __future__ import annotations

import json
import string
import warnings
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import export_reference as ref
from storage.errors import StorageError
from storage.exports import EXPORTERS, parse_options, run_export
from storage.exports import stream as stream_mod
from storage.exports.base import ReleaseData, load_release
from storage.objectstore import open_store
from storage.release import commit_release, parquet_bytes, stage_shard
from storage.schema import SCHEMAS, to_table
from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)

FORMATS = {"trl-prm": ref.trl_prm_export, "math-shepherd": ref.math_shepherd_export, "prm800k": ref.prm800k_export}
OPTIONS = [
    {}, {"step_labels": "per-step"}, {"step_labels": "per-step", "unestimated": "drop"}, {"unestimated": "drop"},
    {"step_labels": "soft-drop"}, {"step_labels": "soft-drop", "consensus": "mc-and-judge"},
    {"consensus": "majority"}, {"consensus": "mc-and-judge"}, {"consensus": "mc-and-check"}, {"consensus": "mc-and-formal"},
]
EXTRA = {"trl-prm": [{"labels": "soft"}, {"labels": "soft", "consensus": "majority"}, {"threshold": 0.5},
                     {"prompt": "template"}],
         "math-shepherd": [{"threshold": 0.3}, {"task": "T", "step_label": "S{i}. "}],
         "prm800k": [{"stop_at_first_error": False}, {"neutral": 1, "positive_min": 0.5}, {"neutral": -1}]}
MANIFEST = {"dataset": "demo", "version": 1, "content_hash": "abc",
            "config": {"prompt": {"family": "completion", "template": "Q: {{ question }}\nA:\n{{ steps }}",
                                  "step_format": {"separator": "\n", "label": "Step {i}: "}}}}


def _outcome(fn, data, opts):
    """Everything an export writes or reports, or the error it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = fn(data, opts)
        except StorageError as exc:
            return ("error", str(exc))
    jsonl = None if r.jsonl is None else "".join(
        json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n" for rec in r.jsonl).encode()
    return parquet_bytes(r.table), jsonl, json.dumps(r.stats, sort_keys=True), r.warnings


def _same(data: ReleaseData, fmt: str, options: dict) -> None:
    opts = parse_options(fmt, options)
    want = _outcome(FORMATS[fmt], data, opts)
    got = _outcome(EXPORTERS[fmt].fn, data, opts)
    if want[0] == "error":
        assert got == want
        return
    assert got[0] == want[0], f"{fmt} {options}: Parquet bytes differ"
    assert got[1:] == want[1:], f"{fmt} {options}: JSONL, stats or warnings differ"


def _step(pid, sid, i, text, k, c, fe=None, value="ratio", verdicts=None, advantage=None):
    return {"problem_id": pid, "solution_id": sid, "step_index": i, "step_text": text, "char_start": 0,
            "char_end": len(text), "mc_k": k, "mc_c": c,
            "mc_value": (None if not k else c / k) if value == "ratio" else value, "q_value": None, "advantage": advantage,
            "first_error_index": fe, "judge_label": None, "formal_label": None, "consensus": None,
            "label_source": "mc", "verdicts": verdicts or []}


def _problem(pid, question, source="gsm8k", answer="1"):
    return {"problem_id": pid, "source": source, "domain": "math", "question": question, "answer": answer,
            "header": None, "formal_statement": None, "metadata": "{}"}


def _verdict(verifier, status):
    return {"verifier": verifier, "version": "1", "status": status, "score": None, "detail": None}


# --- random tables -----------------------------------------------------------------------------------

TEXT = st.text(alphabet=string.ascii_letters + " +-=*/0123456789\"\\\n\t\x01é€ки", max_size=12)
STATUS = st.sampled_from(["valid", "invalid", "error", "timeout", "none"])


@st.composite
def releases(draw) -> ReleaseData:
    n_prob = draw(st.integers(1, 5))
    problems = [_problem(f"p{i}", draw(TEXT), source=draw(st.sampled_from(["gsm8k", "", None])),
                         answer=draw(st.one_of(st.none(), TEXT))) for i in range(n_prob)]
    rows = []
    for p in problems:
        for s in range(draw(st.integers(0, 4))):
            n = draw(st.integers(1, 5))
            fe = draw(st.one_of(st.none(), st.integers(-1, 6)))
            for i in range(n):
                k = draw(st.sampled_from([None, 0, 1, 4]))
                c = None if k is None else draw(st.integers(0, k))
                value = draw(st.sampled_from(["ratio", "ratio", None, 0.25]))
                verdicts = draw(st.lists(st.builds(_verdict, st.sampled_from(["judge", "arith-check", "code-check", "lean"]),
                                                   STATUS), max_size=2))
                advantage = draw(st.sampled_from([None, 0.0, 0.25, -0.5, 0.6]))
                rows.append(_step(p["problem_id"], f"{p['problem_id']}-s{s}", i, draw(TEXT), k, c, fe, value, verdicts,
                                  advantage))
    # A solution whose problem is missing from the problems table: the export must name it, as before.
    if draw(st.booleans()) and rows:
        problems = problems[1:] if len(problems) > 1 else problems
    steps = to_table("steps", rows)
    if steps.num_rows and draw(st.booleans()):  # the exporters must order the rows themselves
        steps = steps.take(pa.array(draw(st.permutations(range(steps.num_rows))), pa.int64()))
    return ReleaseData(MANIFEST, {"problems": to_table("problems", problems), "steps": steps})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=releases(), fmt=st.sampled_from(sorted(FORMATS)), pick=st.integers(0, 100), batch=st.integers(1, 7))
def test_random_tables_export_byte_identical(data, fmt, pick, batch):
    choices = OPTIONS + EXTRA[fmt]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream_mod, "BATCH_ROWS", batch)  # solutions straddle batch boundaries
        _same(data, fmt, choices[pick % len(choices)])


# --- fixed tables ------------------------------------------------------------------------------------


def _fixture_release() -> ReleaseData:
    problems = [_problem("p1", "2+3*4?", answer="14"), _problem("p2", 'say "hi"\\', source="MATH", answer=None),
                _problem("p3", "what does ки mean?")]
    rows = [
        _step("p1", "s1", 1, "12 + 2 = 14", 4, 4, verdicts=[_verdict("judge", "valid"), _verdict("lean", "valid")]),
        _step("p1", "s1", 0, "3 * 4 = 12", 4, 3, verdicts=[_verdict("judge", "valid"), _verdict("arith-check", "valid")],
              advantage=0.25),
        _step("p1", "s2", 0, "2 + 3 = 5", 4, 0, fe=0, verdicts=[_verdict("judge", "invalid")]),
        _step("p1", "s2", 1, "5 * 4 = 20", 4, 0, fe=0),
        _step("p2", "s3", 0, "10 - 4 = 6\n\t\x02", 4, 2, verdicts=[_verdict("judge", "valid")]),
        _step("p2", "s3", 1, "unprobed", None, None),
        _step("p2", "s3", 2, "done", 4, 4),
        _step("p2", "s4", 0, "no estimate", None, None),
        _step("p1", "s5", 0, "oops ки", 4, 1),
        _step("p3", "s6", 0, "1", 4, 4),
    ]
    return ReleaseData(MANIFEST, {"problems": to_table("problems", problems), "steps": to_table("steps", rows)})


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fixture_export_byte_identical(fmt):
    for options in OPTIONS + EXTRA[fmt]:
        _same(_fixture_release(), fmt, options)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_unsorted_table_restarts_sorted(fmt):
    data = _fixture_release()
    steps = data.table("steps")
    shuffled = steps.take(pa.array(list(range(steps.num_rows))[::-1]))
    _same(ReleaseData(MANIFEST, {"problems": data.table("problems"), "steps": shuffled}), fmt, {})


def test_committed_release_of_several_shards_streams_in_order(tmp_path, monkeypatch):
    """Shard files are sorted each but not together (shards follow source order): the merge must give the
    whole-table order, and `run_export` the same files, with batches far smaller than a shard."""
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 3)
    store = open_store(str(tmp_path / "root"))
    problems = [_problem(f"p{i}", f"question {i}?") for i in range(9)]
    shards = {f"s{j}": [j + 6, j + 3, j] for j in range(3)}  # p6,p3,p0 | p7,p4,p1 | p8,p5,p2: interleaved
    for key, pids in shards.items():
        rows = [_step(f"p{p}", f"p{p}-sol{s}", i, f"step {i} of {s}", 4, (p + s + i) % 5, fe=(2 if s == 1 else None))
                for p in pids for s in range(3) for i in range(4)]
        stage_shard(store, "demo", "b", key, {"problems": to_table("problems", [problems[p] for p in pids]),
                                              "steps": to_table("steps", rows)})
    m = commit_release(store, "demo", build_key="b", shard_keys=list(shards), manifest_fields={}, card="# demo\n")
    whole = load_release(store, "demo", m["version"])
    assert len([k for k in m["files"] if k.startswith("steps/")]) == 3
    for fmt in sorted(FORMATS):
        for options in ({}, {"step_labels": "per-step"}):
            want = _outcome(FORMATS[fmt], load_release(store, "demo", m["version"]), parse_options(fmt, options))
            streamed = load_release(store, "demo", m["version"])
            got = _outcome(EXPORTERS[fmt].fn, streamed, parse_options(fmt, options))
            assert got == want, fmt
            assert "steps" not in streamed._tables  # streamed from the files, never read whole
        record = run_export(store, "demo", m["version"], fmt, str(tmp_path / "out" / fmt))
        want_bytes = parquet_bytes(FORMATS[fmt](whole, parse_options(fmt, {})).table)
        assert (tmp_path / "out" / fmt / "data" / "train-00000.parquet").read_bytes() == want_bytes
        if fmt == "prm800k":
            lines = (tmp_path / "out" / fmt / "train.jsonl").read_text().splitlines()
            assert [json.loads(x) for x in lines] == FORMATS[fmt](whole, parse_options(fmt, {})).jsonl
            assert record["files"]["train.jsonl"]["rows"] == len(lines) == record["rows"]


def test_json_strings_match_json_dumps():
    values = ["plain", 'q"uote', "back\\slash", "nl\nrt\rtab\t", "\x00\x01\x1f\x7f", "é€ки\u2028", "", None]
    got = stream_mod.json_strings(pa.array(values, pa.string())).to_pylist()
    assert got == [json.dumps(v, ensure_ascii=False) for v in values]


def test_json_strings_scan_blocks_slices_and_nulls():
    """The escape scan works on the data buffer in blocks: a character to escape on either side of a block
    edge, in a sliced array (offsets not from 0), beside nulls and empty strings, is found as json.dumps finds it."""
    edge = stream_mod._SCAN_BLOCK
    values = ["a" * (edge - 1) + '"', "\\" + "b" * 10, None, "", "x" * edge, "\x1f", "é" * 5 + "\n", "plain"]
    arr = pa.array(["lead\t", *values, "tail"], pa.string()).slice(1, len(values))
    assert stream_mod.json_strings(arr).to_pylist() == [json.dumps(v, ensure_ascii=False) for v in values]
    assert stream_mod.json_escaped(pa.array(["ok", None], pa.string())).to_pylist() == ["ok", None]


def test_join_pieces_concatenates_in_order():
    parts = [pa.array(["<", ">"], pa.string()).slice(1), pa.array(["", "ab", "é", None], pa.string())]  # a slice, a null
    pieces = np.array([2, 0, 3, 3, 0, 1], np.int32)  # source: ">", "", "ab", "é", None
    bounds = np.array([0, 3, 3, 6])
    got = stream_mod.join_pieces(parts, pieces, bounds)
    assert got.to_pylist() == ["ab>é", "", "é>"] and got.type == pa.string()
    got.validate(full=True)
    assert stream_mod.join_pieces(parts, np.zeros(0, np.int32), np.array([0, 0])).to_pylist() == [""]
    assert stream_mod.join_pieces([], np.zeros(0, np.int32), np.array([0])).to_pylist() == []


def test_problem_lookup_by_range_matches_index_in():
    """`ProblemLookup` looks among the sorted ids between a batch's smallest and largest only: the same rows as
    `index_in` over the whole table (repeated ids: the last row wins; missing ids: null), sorted or not."""
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    ids = [f"p{i:05d}" for i in rng.integers(0, 6000, 9000)]  # repeats, and gaps
    lookup = stream_mod.ProblemLookup(pa.table({"problem_id": ids, "question": [str(i) for i in range(9000)]}))
    for trial in range(100):
        asked = sorted(f"p{i:05d}" for i in rng.integers(0, 6100, int(rng.integers(1, 50))))
        q = pa.array(asked if trial % 2 else list(rng.permutation(asked)), pa.string())
        assert lookup._index_in(q).equals(pc.index_in(q, value_set=lookup._ids))


def test_empty_steps_table():
    data = ReleaseData(MANIFEST, {"problems": to_table("problems", []), "steps": SCHEMAS["steps"].empty_table()})
    for fmt in sorted(FORMATS):
        _same(data, fmt, {})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=releases(), rule=st.sampled_from(["first-error", "per-step", "soft-drop"]), threshold=st.sampled_from([0.0, 0.0, 0.3]),
       unestimated=st.sampled_from(["infer", "drop"]))
def test_label_rules_column_wise_match_per_solution(data, rule, threshold, unestimated):
    """`stream.step_labels` against `labels.solution_labels` (the per-solution rules) on every solution."""
    from storage.exports.base import solutions
    from storage.exports.labels import LABEL_COLUMNS, solution_labels

    if rule != "per-step":
        threshold = 0.0
    steps = data.table("steps")
    want = solution_labels(solutions(steps, LABEL_COLUMNS), rule, threshold, unestimated)
    got = []
    for b in stream_mod.solution_batches(data, LABEL_COLUMNS, presort=True):
        labels, decided = step_labels_of(b, rule, threshold, unestimated)
        got += [labels[b.starts[j]: b.starts[j + 1]].tolist() if decided[j] else None for j in range(b.count)]
    assert got == want


step_labels_of = stream_mod.step_labels


# --- the output, streamed into the store -------------------------------------------------------------


def _pair(pid, n, kind, margin):
    # Pairs 0 and 1 share a prefix (rstar-ppm merges them), pair 2 rejects what pair 0 chose (ambiguous).
    return {"pair_id": f"{pid}-x{n}", "problem_id": pid, "prompt": "unused", "prefix_steps": ["step 0"] * (n // 2),
            "chosen": f"good {n}", "rejected": "good 0" if n == 2 else f"bad {n}",
            "chosen_value": (None, 0.7, 1.0)[n % 3], "rejected_value": (0.2, None, 0.0)[n % 3], "margin": margin,
            "full_chosen": None if n % 2 else f"Step 2: good {n}\n", "full_rejected": None, "answer": None if n % 3 else "7",
            "kind": kind, "group_id": None, "rank": None}


def _several_shards(store, n_problems: int = 12, shards: int = 3, same_question: dict[int, int] | None = None) -> int:
    """A release of `shards` shard files, sorted each but interleaved; `same_question` {i: j}: problem i
    asks problem j's question (a duplicate for `--dedup`)."""
    asks = {i: (same_question or {}).get(i, i) for i in range(n_problems)}
    problems = [_problem(f"p{i:02d}", f"What is the value of question number {asks[i]} in this test?",
                         source=("MATH" if i % 2 else None)) for i in range(n_problems)]
    for j in range(shards):
        pids = list(range(j, n_problems, shards))[::-1]
        rows = [_step(f"p{p:02d}", f"p{p:02d}-sol{s}", i, f"step {i} of {s} \"q\"", 4, (p + s + i) % 5,
                      fe=(2 if s == 1 else None)) for p in pids for s in range(3) for i in range(4)]
        pairs = [_pair(f"p{p:02d}", n, ("first_error", "sibling", "ranked")[n % 3], (None, 0.2, 0.9)[(p + n) % 3])
                 for p in pids for n in range(p % 4)]
        stage_shard(store, "demo", "b", f"s{j}", {"problems": to_table("problems", [problems[p] for p in pids]),
                                                  "steps": to_table("steps", rows), "pairs": to_table("pairs", pairs)})
    m = commit_release(store, "demo", build_key="b", shard_keys=[f"s{j}" for j in range(shards)],
                       manifest_fields={}, card="# demo\n")
    return m["version"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_large_export_cut_in_fixed_row_groups_whatever_the_batches(tmp_path, monkeypatch, fmt):
    """Above ROW_GROUP_ROWS the file is cut every ROW_GROUP_ROWS rows: its bytes are those of
    `write_table(whole, row_group_size=ROW_GROUP_ROWS)` and do not depend on the input batch size."""
    import hashlib

    import pyarrow.parquet as pq

    from storage.exports import write as write_mod

    monkeypatch.setattr(write_mod, "ROW_GROUP_ROWS", 5)
    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store)
    whole = FORMATS[fmt](load_release(store, "demo", version), parse_options(fmt, {}))
    sink = pa.BufferOutputStream()
    pq.write_table(whole.table, sink, row_group_size=5, **write_mod.PARQUET_OPTIONS)
    want = sink.getvalue().to_pybytes()
    outs = []
    for batch in (1, 3, 7, 10_000):
        monkeypatch.setattr(stream_mod, "BATCH_ROWS", batch)
        out = tmp_path / f"out-{batch}"
        record = run_export(store, "demo", version, fmt, str(out))
        got = (out / "data" / "train-00000.parquet").read_bytes()
        assert got == want, f"batch {batch}"
        meta = record["files"]["data/train-00000.parquet"]
        assert meta == {"sha256": hashlib.sha256(got).hexdigest(), "bytes": len(got), "rows": whole.table.num_rows}
        assert json.loads((out / "export.json").read_text())["files"] == record["files"]
        if fmt == "prm800k":
            body = (out / "train.jsonl").read_bytes()
            assert record["files"]["train.jsonl"]["sha256"] == hashlib.sha256(body).hexdigest()
            assert [json.loads(x) for x in body.decode().splitlines()] == list(whole.jsonl)
        outs.append(out)
    assert pq.ParquetFile(outs[0] / "data" / "train-00000.parquet").num_row_groups == -(-whole.table.num_rows // 5) > 1
    assert pq.read_table(outs[0] / "data" / "train-00000.parquet").equals(whole.table)
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(outs[0] / "data" / "train-00000.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == whole.table.num_rows
    assert loaded[7] == whole.table.slice(7, 1).to_pylist()[0]


PAIR_FORMATS = {"trl-dpo": ref.trl_dpo_export, "step-dpo": ref.step_dpo_export, "rstar-ppm": ref.rstar_ppm_export}
PAIR_OPTIONS = {"trl-dpo": [{}, {"style": "conversational"}, {"continuation": "full", "kinds": ["first_error", "ranked"]},
                            {"min_margin": 0.5}, {"consensus": "mc-and-judge"}, {"kinds": []}],
                "step-dpo": [{}, {"kinds": ["sibling", "ranked"], "dataset_column": "D"}, {"consensus": "majority"}],
                "rstar-ppm": [{}, {"kinds": ["sibling", "ranked"], "max_per_side": 1}, {"kinds": []}]}


@pytest.mark.parametrize("fmt", sorted(PAIR_FORMATS))
def test_pair_exports_stream_byte_identical(tmp_path, monkeypatch, fmt):
    """The pair exports read the pairs file by file, batch by batch: the same bytes, stats and records as the
    whole-table exporters, from files and from memory, whatever the batch size."""
    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store)
    for options in PAIR_OPTIONS[fmt]:
        opts = parse_options(fmt, options)
        want = _outcome(PAIR_FORMATS[fmt], load_release(store, "demo", version), opts)
        for batch in (1, 4, 10_000):
            monkeypatch.setattr(stream_mod, "RECORD_BATCH_ROWS", batch)
            streamed = load_release(store, "demo", version)
            assert _outcome(EXPORTERS[fmt].fn, streamed, opts) == want, (options, batch)
            if getattr(opts, "consensus", "none") == "none":
                assert "pairs" not in streamed._tables  # read by batches, never whole
            whole = load_release(store, "demo", version)
            whole.table("pairs")
            assert _outcome(EXPORTERS[fmt].fn, whole, opts) == want, (options, batch)
        if want[0] == "error":  # e.g. a two-party consensus rule on steps without the partner's verdicts
            continue
        record = run_export(store, "demo", version, fmt, str(tmp_path / "out" / fmt), options)
        assert (tmp_path / "out" / fmt / "data" / "train-00000.parquet").read_bytes() == want[0]
        assert json.dumps(record["stats"], sort_keys=True) == want[2]


def test_filtered_export_streams_and_matches_filtered_tables(tmp_path, monkeypatch):
    """`--dedup` leaves out problems through a lazy view: the steps and pairs are still read in batches, and
    every export equals the old exporters' on the tables read whole and filtered."""
    import pyarrow.compute as pc

    from storage.dedup import DedupConfig
    from storage.exports import filter_release

    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store, same_question={7: 4, 11: 4})
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 4)
    monkeypatch.setattr(stream_mod, "RECORD_BATCH_ROWS", 3)
    whole = load_release(store, "demo", version)
    for fmt, ref_fn in {**FORMATS, **PAIR_FORMATS}.items():
        view, report = filter_release(load_release(store, "demo", version), DedupConfig(enabled=True), None)
        assert report["problems_dropped"] == 2
        assert sorted(set(whole.table("problems")["problem_id"].to_pylist()) - set(view.keep_problems.to_pylist())) == ["p07", "p11"]
        tables = {name: whole.table(name).filter(pc.is_in(whole.table(name)["problem_id"], value_set=view.keep_problems))
                  for name in ("problems", "nodes", "steps", "pairs", "mustard")}
        want = _outcome(ref_fn, ReleaseData(whole.manifest, tables), parse_options(fmt, {}))
        assert want[0] != "error" and len(want[0]) > 0
        assert _outcome(EXPORTERS[fmt].fn, view, parse_options(fmt, {})) == want, fmt
        assert "steps" not in view._tables and "pairs" not in view._tables
        record = run_export(store, "demo", version, fmt, str(tmp_path / "out" / fmt), dedup=DedupConfig(enabled=True))
        assert (tmp_path / "out" / fmt / "data" / "train-00000.parquet").read_bytes() == want[0]
        assert record["filters"]["problems_dropped"] == 2


def test_export_to_s3_streams_multipart(tmp_path, monkeypatch, s3_root):
    """The same export on an S3 target, in multipart parts: the same bytes and records as on a folder."""
    import moto.s3.models

    from storage import objectstore

    monkeypatch.setattr(objectstore, "_PART_BYTES", 1024)  # and moto (in this process) told to take such parts
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1024)
    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store, n_problems=30)
    local = run_export(store, "demo", version, "prm800k", str(tmp_path / "out"))
    remote_store = open_store(s3_root + "/out")
    remote = run_export(store, "demo", version, "prm800k", remote_store)
    assert remote["files"] == local["files"] and local["files"]["train.jsonl"]["bytes"] > 4 * 1024
    head = remote_store._client.head_object(Bucket=remote_store.bucket, Key=remote_store._k("train.jsonl"))
    assert "-" in head["ETag"]  # went up in parts
    for key in local["files"]:
        assert remote_store.read_bytes(key) == (tmp_path / "out" / key).read_bytes()


@pytest.mark.parametrize("target", ["local", "s3"])
def test_failed_export_leaves_no_file(tmp_path, monkeypatch, target, request):
    """An export that fails halfway (a solution whose problem is missing, found in a later batch) leaves the
    previous export's files as they were and no partial file."""
    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store)
    out = open_store(str(tmp_path / "out")) if target == "local" else open_store(request.getfixturevalue("s3_root"))
    first = run_export(store, "demo", version, "prm800k", out)
    before = {k: out.read_bytes(k) for k in out.list()}
    data = load_release(store, "demo", version)
    problems = data.table("problems")
    data._tables["problems"] = problems.filter(pa.compute.not_equal(problems["problem_id"], "p11"))
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 4)
    from storage.exports import write as write_mod

    monkeypatch.setattr(write_mod, "ROW_GROUP_ROWS", 3)  # row groups written before the failure
    with pytest.raises(StorageError, match="p11"):
        run_export(store, "demo", version, "prm800k", out, {"stop_at_first_error": False}, data=data)
    assert {k: out.read_bytes(k) for k in out.list()} == before
    assert first["files"]["data/train-00000.parquet"]["rows"] > 0
    if target == "local":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "data", "export.json", "train.jsonl"]
        assert [p.name for p in (tmp_path / "out" / "data").iterdir()] == ["train-00000.parquet"]


def test_write_failure_on_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    """Batches are written on a thread of their own while the exporter makes the next ones: a write that fails
    there (a full disk) is raised by run_export, leaves no file, and the thread is gone."""
    import threading

    from storage.objectstore import ObjectWriter

    store = open_store(str(tmp_path / "root"))
    version = _several_shards(store)
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 4)
    from storage.exports import write as write_mod

    monkeypatch.setattr(write_mod, "ROW_GROUP_ROWS", 3)  # several row groups, so several writes
    real_write, calls = ObjectWriter.write, []

    def failing(self, data):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(ObjectWriter, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        run_export(store, "demo", version, "prm800k", open_store(str(tmp_path / "out")))
    assert "export-writer" in calls  # the writes did happen off the exporter's thread
    assert not any(t.name == "export-writer" for t in threading.enumerate())
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# --- pair exports with a consensus rule, and rstar-ppm: merged by problem -------------------------------------


@st.composite
def pair_releases(draw) -> tuple[ReleaseData, list[pa.Table]]:
    """A random release (`releases`) with pairs cut from its solutions (a prefix, the next step as rejected, a
    step of another solution or a random text as chosen), so consensus rules confirm, contradict and drop
    some; and the pairs split into `shards` tables, each sorted, as shard files are."""
    data = draw(releases())
    steps = data.table("steps").sort_by([(k, "ascending") for k in stream_mod.KEYS]).to_pylist()
    by_solution: dict[str, list[dict]] = {}
    for row in steps:
        by_solution.setdefault(row["solution_id"], []).append(row)
    solutions = list(by_solution.values())
    rows = []
    for n in range(draw(st.integers(0, 12))):
        if solutions and draw(st.integers(0, 4)):
            sol = draw(st.sampled_from(solutions))
            i = draw(st.integers(0, len(sol) - 1))
            pid, prefix, rejected = sol[0]["problem_id"], [s["step_text"] for s in sol[:i]], sol[i]["step_text"]
            other = draw(st.sampled_from(solutions))
            chosen = other[min(i, len(other) - 1)]["step_text"] if draw(st.booleans()) else draw(TEXT)
        else:
            pid, prefix, rejected, chosen = f"p{draw(st.integers(0, 5))}", draw(st.lists(TEXT, max_size=2)), draw(TEXT), draw(TEXT)
        rows.append({**_pair(pid, n, draw(st.sampled_from(["first_error", "sibling", "ranked", None])),
                             draw(st.sampled_from([None, 0.2, 0.9]))),
                     "prefix_steps": prefix, "chosen": chosen, "rejected": rejected,
                     "chosen_value": draw(st.sampled_from([None, 0.5, 1.0])), "rejected_value": draw(st.sampled_from([None, 0.0, 0.5]))})
    cut = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=2)))
    shards = [to_table("pairs", part) for part in (rows[a:b] for a, b in zip([0, *cut], [*cut, len(rows)]))]
    return ReleaseData(MANIFEST, {**data._tables, "pairs": pa.concat_tables(shards)}), shards


PAIR_CHOICES = [{}, {"consensus": "mc-and-judge"}, {"consensus": "majority"}, {"consensus": "mc-and-check"},
                {"consensus": "mc-and-formal"}, {"consensus": "majority", "kinds": ["first_error", "sibling"]},
                {"consensus": "mc-and-judge", "min_margin": 0.5}, {"kinds": ["ranked"]}]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=pair_releases(), fmt=st.sampled_from(sorted(PAIR_FORMATS)), pick=st.integers(0, 100),
       batch=st.integers(1, 5), files=st.booleans())
def test_random_pair_releases_export_byte_identical(tmp_path_factory, drawn, fmt, pick, batch, files):
    """trl-dpo/step-dpo with every consensus rule and rstar-ppm, against the whole-table exporters: from memory
    (pairs in the order stored) and from committed shard files (each sorted, interleaved by problem), with
    steps and pairs read in batches of a few rows, so problems and solutions straddle batches."""
    data, shards = drawn
    options = PAIR_CHOICES[pick % len(PAIR_CHOICES)]
    if fmt == "rstar-ppm":
        options = {k: v for k, v in options.items() if k == "kinds"}
    elif fmt == "step-dpo":
        options = {k: v for k, v in options.items() if k != "min_margin"}
    opts = parse_options(fmt, options)
    if files:
        store = open_store(str(tmp_path_factory.mktemp("root")))
        steps, problems = data.table("steps"), data.table("problems")
        for j, pairs in enumerate(shards or [SCHEMAS["pairs"].empty_table()]):
            # Each shard's steps sorted (as a build writes them); the steps go with the first shard.
            stage_shard(store, "demo", "b", f"s{j}", {"pairs": pairs, **({"steps": to_table("steps", steps.to_pylist()),
                                                                            "problems": problems} if j == 0 else {})})
        m = commit_release(store, "demo", build_key="b", shard_keys=[f"s{j}" for j in range(max(1, len(shards)))],
                           manifest_fields={}, card="# demo\n")
        load = lambda: load_release(store, "demo", m["version"])  # noqa: E731
    else:
        load = lambda: ReleaseData(MANIFEST, dict(data._tables))  # noqa: E731
    want = _outcome(PAIR_FORMATS[fmt], load(), opts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream_mod, "BATCH_ROWS", batch)
        mp.setattr(stream_mod, "RECORD_BATCH_ROWS", batch)
        mp.setattr(stream_mod, "MIN_FILE_BATCH", 1)
        streamed = load()
        assert _outcome(EXPORTERS[fmt].fn, streamed, opts) == want, options
    if files:
        assert "steps" not in streamed._tables and "pairs" not in streamed._tables


PROMPT_LAYOUTS = [
    MANIFEST["config"]["prompt"],
    {"template": "{{ question }}\n\n{{ steps }}", "step_format": {"separator": "\n\n", "label": None}},
    {"template": "Q: {{ question | upper }}\r\n{{ steps }}", "step_format": {"label": "S{i}. "}},  # head via Jinja
    {"template": "{% if steps %}Go on:{% endif %}{{ question }}\n{{ steps }}"},  # not steps-last: per pair
    {"template": "{{ question }}\n{{ steps }}", "step_format": {"label": "{x}"}},  # a label that fails to format
    {"family": "chat", "template": "{{ question }}", "chat_template": "{% for m in messages %}<{{ m.role }}>"
     "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "system": "S"},
]
RECORD_OPTIONS = {"trl-dpo": [{}, {"continuation": "full"}, {"style": "conversational", "continuation": "full"},
                              {"consensus": "majority", "continuation": "full"}],
                  "step-dpo": [{}, {"dataset_column": "D"}, {"kinds": ["first_error", "sibling", "ranked"]},
                               {"consensus": "majority", "kinds": ["first_error", "sibling"]}]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=pair_releases(), fmt=st.sampled_from(sorted(RECORD_OPTIONS)), pick=st.integers(0, 100),
       layout=st.sampled_from(PROMPT_LAYOUTS), batch=st.integers(1, 5), missing=st.booleans(), nulls=st.booleans())
def test_random_pair_records_column_wise_byte_identical(drawn, fmt, pick, layout, batch, missing, nulls):
    """The pair exports' records built column-wise (`pair_columns`) against the whole-table exporters, for every
    prompt layout they handle differently (plain, Jinja-rendered and chat heads, templates that need a render per
    pair, unlabelled steps, a label that fails) and options (full continuations, the dataset column, every pair
    kind), with pairs whose problem is missing or whose strings are null."""
    data, _ = drawn
    pairs = data.table("pairs")
    if missing and pairs.num_rows:  # a pair whose problem is not in the problems table: the error names it
        pids = pairs.column("problem_id").to_pylist()
        pids[pick % len(pids)] = "nowhere"
        pairs = pairs.set_column(1, "problem_id", pa.array(pids, pa.string()))
    if nulls and pairs.num_rows:
        for name in ("answer", "full_chosen", "full_rejected", "prefix_steps"):
            i = pairs.schema.get_field_index(name)
            values = pairs.column(name).to_pylist()
            values[(pick + i) % len(values)] = None if name != "full_chosen" else ""
            pairs = pairs.set_column(i, name, pa.array(values, pairs.schema.field(name).type))
    manifest = {**MANIFEST, "config": {"prompt": layout}}
    options = RECORD_OPTIONS[fmt][pick % len(RECORD_OPTIONS[fmt])]
    opts = parse_options(fmt, options)
    load = lambda: ReleaseData(manifest, {**data._tables, "pairs": pairs})  # noqa: E731

    def outcome(fn):  # a label that fails to format raises str.format's own error, not a StorageError
        try:
            return _outcome(fn, load(), opts)
        except Exception as exc:  # noqa: BLE001
            return "raised", type(exc), str(exc)

    want = outcome(PAIR_FORMATS[fmt])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream_mod, "BATCH_ROWS", batch)
        mp.setattr(stream_mod, "RECORD_BATCH_ROWS", batch)
        mp.setattr(stream_mod, "MIN_FILE_BATCH", 1)
        assert outcome(EXPORTERS[fmt].fn) == want, options


def test_pair_consensus_on_several_shards_matches_and_keeps_pairs(tmp_path, monkeypatch):
    """A committed release whose pairs a rule confirms (judge verdicts agreeing with MC), in interleaved shard
    files: the same bytes and report as the whole-table exporters, most pairs kept, nothing read whole."""
    from export_reference import select_pairs

    store = open_store(str(tmp_path / "root"))
    problems = [_problem(f"p{i:02d}", f"question {i}?") for i in range(9)]
    for j in range(3):
        pids = list(range(j, 9, 3))[::-1]
        rows, pairs = [], []
        for p in pids:
            for s in range(3):
                fe = 1 if s != 2 else None  # solutions 0, 1: first error at step 1; the judge says so too
                texts = [f"p{p} s{s % 2} step {i}" for i in range(3)]  # solutions 0 and 2 share their steps
                rows += [_step(f"p{p:02d}", f"p{p:02d}-sol{s}", i, texts[i], 4, 0 if fe is not None and i >= fe else 2,
                               fe=fe, verdicts=[_verdict("judge", "invalid" if fe is not None and i == fe else "valid")])
                         for i in range(3)]
            pairs += [{**_pair(f"p{p:02d}", n, "first_error", 0.9), "prefix_steps": [f"p{p} s{n % 2} step 0"],
                       "rejected": f"p{p} s{n % 2} step 1", "chosen": f"other {n}" if n < 2 else f"p{p} s0 step 1"}
                      for n in range(3)]
        stage_shard(store, "demo", "b", f"s{j}", {"problems": to_table("problems", [problems[p] for p in pids]),
                                                  "steps": to_table("steps", rows), "pairs": to_table("pairs", pairs)})
    m = commit_release(store, "demo", build_key="b", shard_keys=["s0", "s1", "s2"], manifest_fields={}, card="# demo\n")
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 4)
    monkeypatch.setattr(stream_mod, "RECORD_BATCH_ROWS", 2)
    monkeypatch.setattr(stream_mod, "MIN_FILE_BATCH", 1)
    for rule in ("mc-and-judge", "majority"):
        kept, report = select_pairs(load_release(store, "demo", m["version"]), None, None, rule)
        assert len(kept) == 18 and report["dropped"] == {"chosen contradicted": 9}, report  # pair 2: chosen is an error
        for fmt in ("trl-dpo", "step-dpo"):
            opts = parse_options(fmt, {"consensus": rule})
            want = _outcome(PAIR_FORMATS[fmt], load_release(store, "demo", m["version"]), opts)
            streamed = load_release(store, "demo", m["version"])
            assert _outcome(EXPORTERS[fmt].fn, streamed, opts) == want, (fmt, rule)
            assert "steps" not in streamed._tables and "pairs" not in streamed._tables


def _peaks(stream, load: Callable[[], ReleaseData], fmt: str, options: dict) -> tuple[int, int]:
    """(Python peak, Arrow peak) in bytes while one export of `load()` streams to nowhere: tracemalloc's peak, and
    the peak of a proxy memory pool that is Arrow's default pool for the duration.

    The export runs once unmeasured first, on another `load()`, with storage.render's per-question caches
    emptied before: those caches (prompt heads, up to 4096 questions, one process-wide memo) then hold this
    release's questions and nothing else. Otherwise the measured run paid for filling them or not depending
    on what ran before in the process: rstar-ppm read from files was at 0.88, 0.93 or 0.97 of its bound
    depending on the test order (the other pair formats had filled them first until they stopped using them),
    0.997 when it filled them itself, ~230 B per question. The measured run reads the release afresh, so
    whatever it holds whole (the problems table) is still counted."""
    import tracemalloc

    from conftest import arrow_proxy_pool
    from storage import render

    render._question_part.cache_clear()
    render._chat_turns.cache_clear()
    stream(load(), parse_options(fmt, options), False).drain(lambda batch: None)
    data = load()
    pool = arrow_proxy_pool()  # outlives this test: see conftest
    old = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        stream(data, parse_options(fmt, options), False).drain(lambda batch: None)
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(old)
    return python, pool.max_memory()


@pytest.mark.parametrize("fmt, options", [("trl-dpo", {"consensus": "mc-and-judge"}), ("step-dpo", {"consensus": "majority"}),
                                          ("rstar-ppm", {})])
def test_pair_exports_memory_does_not_grow_with_the_release(tmp_path, monkeypatch, fmt, options):
    """Peak memory of a streamed pair export on 4× the rows stays within a quarter of its peak on the smaller
    release, plus the problems table (held whole by design: ~200 B a problem): bounded by the batch sizes, not
    the data. The whole-table exporters grew 4× here (tests/export_reference.py: 17.9 → 71.7 MB of Python
    objects, 4.4 → 17.7 MB of Arrow for trl-dpo with consensus). Python objects (tracemalloc) from committed
    files and from tables in memory; Arrow buffers (a proxy pool) from tables in memory, since the Parquet
    reader decodes whole pages (up to the format's 1 MB a column), which grow with a small file."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("storage_throughput", REPO / "benchmarks" / "storage_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = open_store(str(tmp_path / "root"))
    tables = {}
    for name, rows in (("small", 20_000), ("large", 80_000)):
        tables[name] = bench.make_tables(rows, judged=True)
        stage_shard(store, name, "b", "s0", tables[name])
        commit_release(store, name, build_key="b", shard_keys=["s0"], manifest_fields={}, card="# bench\n")
    extra_problems = tables["large"]["problems"].num_rows - tables["small"]["problems"].num_rows
    monkeypatch.setattr(stream_mod, "BATCH_ROWS", 2048)
    monkeypatch.setattr(stream_mod, "RECORD_BATCH_ROWS", 512)
    monkeypatch.setattr(stream_mod, "MIN_FILE_BATCH", 256)
    export = EXPORTERS[fmt].stream
    for source in ("files", "memory"):  # each measurement warms up first (imports, caches): see _peaks
        small, large = (_peaks(export, (lambda n=name: load_release(store, n, 1)) if source == "files"
                               else (lambda n=name: ReleaseData(MANIFEST, dict(tables[n]))), fmt, options)
                        for name in ("small", "large"))
        assert large[0] < 1.25 * small[0] + 200 * extra_problems, (source, small, large)
        if source == "memory":
            assert large[1] < 1.25 * small[1] + 200 * extra_problems, (source, small, large)


# --- rows without a key ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, options, table, field", [
    ("trl-prm", {}, "steps", "solution_id"),
    ("prm800k", {}, "steps", "problem_id"),
    ("trl-dpo", {"consensus": "mc-and-judge"}, "pairs", "pair_id"),
    ("rstar-ppm", {}, "pairs", "problem_id"),
])
def test_a_row_without_a_key_is_a_record_error_naming_it(fmt, options, table, field):
    """A null key has no place in the merge order, sorted or not: the export stops with the table, the row's
    keys and the field (not the merge's internal restart signal, which escaped before)."""
    data = _fixture_release()
    pairs = [_pair("p1", n, "first_error", 0.5) for n in range(3)]
    tables = {"problems": data.table("problems"), "steps": data.table("steps"), "pairs": to_table("pairs", pairs)}
    rows = tables[table].to_pylist()
    rows[1][field] = None
    tables[table] = pa.Table.from_pylist(rows, schema=tables[table].schema)
    with pytest.raises(StorageError, match=rf"^{table}\[.*{field}=None.*\]: {field} is null") as err:
        EXPORTERS[fmt].fn(ReleaseData(MANIFEST, tables), parse_options(fmt, options))
    assert err.value.field == field


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("last_estimated", [False, True])
def test_unsorted_rows_fail_or_pass_as_the_sorted_ones_would(fmt, last_estimated):
    """Found by `test_random_tables_export_byte_identical`: unsorted steps read as if sorted make a one-step
    'solution' of p0-s1's first step, whose problem is missing; the stream used to fail on it before the
    disorder showed (on a release the reference exports, or naming p0-s1 where the reference names p0-s3).
    The error of the streaming pass now waits for the sorted rerun."""
    order = [("p0-s1", 0), ("p0-s2", 0), ("p0-s2", 1), ("p0-s0", 3), ("p0-s0", 0), ("p0-s1", 1), ("p0-s1", 2),
             ("p0-s0", 1), ("p0-s0", 2), *[("p0-s2", i) for i in (2, 3, 4)], *[("p0-s3", i) for i in range(5)]]
    rows = [_step("p0", sid, i, "x", *((1, 0) if (sid, i) == ("p0-s1", 0) or (last_estimated and (sid, i) == ("p0-s3", 4))
                                        else (None, None))) for sid, i in order]
    rows += [_step("p1", "p1-s0", i, "y", None, None) for i in range(4)]
    data = ReleaseData(MANIFEST, {"problems": to_table("problems", [_problem("p1", "q")]),
                                  "steps": pa.Table.from_pylist(rows, schema=SCHEMAS["steps"])})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream_mod, "BATCH_ROWS", 1)
        for options in OPTIONS + EXTRA[fmt]:
            _same(data, fmt, options)


@pytest.mark.parametrize("pair_texts, sol_texts", [
    (["a", "b", "", None], ["a", "b", "", None]),
    # Solutions drawing from more texts than the pairs: solution steps no pair has share one code
    # (`pair_stream._codes_beside`), so several distinct absent steps, and absent steps before present ones, meet.
    (["a", "b", None], ["a", "b", None, "c", "d", ""]),
], ids=["same texts", "more solution texts"])
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_pair_keep_columns_is_pair_keep_mask(pair_texts, sol_texts, data):
    """The column-wise pair filter (a trie of prefixes) against `export_reference.pair_keep_mask` (tuples of prefixes), on
    few texts so prefixes collide: shared and null steps, null prefixes, first errors at and past a solution's end."""
    from export_reference import pair_keep_mask

    from storage.consensus import Decision
    from storage.exports.pair_stream import _KEPT, pair_keep_columns

    ptexts, stexts = st.sampled_from(pair_texts), st.sampled_from(sol_texts)
    pids = st.sampled_from(["p1", "p2"])
    sols = data.draw(st.lists(st.tuples(pids, st.lists(stexts, min_size=1, max_size=4), st.integers(0, 4)), max_size=6))
    pairs = data.draw(st.lists(st.fixed_dictionaries({"problem_id": pids, "prefix_steps": st.one_of(st.none(), st.lists(ptexts, max_size=3)),
                                                      "chosen": ptexts, "rejected": ptexts}), max_size=8))
    want = pair_keep_mask(pairs, [(p, t, Decision(True, f, "kept")) for p, t, f in sols])
    table = pa.table({"problem_id": pa.array([p["problem_id"] for p in pairs], pa.string()),
                      "prefix_steps": pa.array([p["prefix_steps"] for p in pairs], pa.list_(pa.string())),
                      "chosen": pa.array([p["chosen"] for p in pairs], pa.string()),
                      "rejected": pa.array([p["rejected"] for p in pairs], pa.string())})
    solutions = pa.Table.from_pylist([{"problem_id": p, "steps": t, "first_error": f} for p, t, f in sols], schema=_KEPT)
    mask, dropped = pair_keep_columns(table, solutions)
    assert (mask.tolist(), dropped) == want
