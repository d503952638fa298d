"""Every export against its exact column names and types, label rules, prompt rendering from the manifest,
and a round trip through `datasets.load_dataset("parquet", ...)` (local folder and S3 via storage_options)."""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pytest

from s3_fixtures import moto_server, s3_env, s3_root  # noqa: F401  (fixtures)
from storage.errors import ConfigError, StorageError
from storage.exports import EXPORTERS, export_records, parse_options, run_export
from storage.exports.base import ReleaseData, SoftLabelWarning
from storage.objectstore import open_store
from storage.release import commit_release, stage_shard
from storage.schema import to_table

TEMPLATE = "Q: {{ question }}\nA:\n{{ steps }}"
MANIFEST = {
    "dataset": "demo",
    "version": 1,
    "content_hash": "abc",
    "seed": 7,
    "algorithm": "math-shepherd",
    "config": {"prompt": {"family": "completion", "template": TEMPLATE, "step_format": {"separator": "\n", "label": "Step {i}: "}}},
}


def _problems():
    return to_table("problems", [
        {"problem_id": "p1", "source": "gsm8k", "domain": "math", "question": "2+3*4?", "answer": "14", "header": None,
         "formal_statement": None, "metadata": "{}"},
        {"problem_id": "p2", "source": "gsm8k", "domain": "math", "question": "10-4?", "answer": "6", "header": None,
         "formal_statement": None, "metadata": "{}"},
    ])


def _step(pid, sid, i, text, k, c, fe=None):
    return {"problem_id": pid, "solution_id": sid, "step_index": i, "step_text": text, "char_start": 0,
            "char_end": len(text), "mc_k": k, "mc_c": c, "mc_value": None if k is None else c / k, "q_value": None,
            "advantage": None, "first_error_index": fe, "judge_label": None, "formal_label": None, "consensus": None,
            "label_source": "mc"}


def _steps():
    return to_table("steps", [
        # written out of order: exporters must order by step_index
        _step("p1", "s1", 1, "12 + 2 = 14", 4, 4),
        _step("p1", "s1", 0, "3 * 4 = 12", 4, 3),
        _step("p1", "s2", 0, "2 + 3 = 5", 4, 0, fe=0),
        _step("p1", "s2", 1, "5 * 4 = 20", 4, 0, fe=0),
        _step("p2", "s3", 0, "10 - 4 = 6", 4, 2),
        _step("p2", "s4", 0, "no estimate", None, None),  # dropped: no MC evidence
    ])


def _pair(pid, prefix, chosen, rejected, kind, cv=1.0, rv=0.0, pair_id=None):
    return {"pair_id": pair_id or f"{pid}-{chosen}-{rejected}", "problem_id": pid, "prompt": "unused", "prefix_steps": prefix,
            "chosen": chosen, "rejected": rejected, "chosen_value": cv, "rejected_value": rv, "margin": cv - rv,
            "full_chosen": None, "full_rejected": None, "answer": None, "kind": kind, "group_id": None, "rank": None}


def _pairs():
    rows = [
        _pair("p1", ["3 * 4 = 12"], "12 + 2 = 14", "12 + 2 = 15", "first_error"),
        _pair("p1", ["3 * 4 = 12"], "2 + 12 = 14", "12 + 2 = 15", "sibling", cv=0.9, rv=0.1),
        _pair("p2", [], "10 - 4 = 6", "10 - 4 = 7", "sibling", cv=0.75, rv=0.0),
    ]
    rows[0]["full_chosen"] = "Step 2: 12 + 2 = 14\n"
    rows[0]["full_rejected"] = "Step 2: 12 + 2 = 15\nStep 3: The answer is 15.\n"
    rows[0]["answer"] = "14"
    return to_table("pairs", rows)


def _data(**overrides) -> ReleaseData:
    tables = {"problems": _problems(), "steps": _steps(), "pairs": _pairs(), **overrides}
    return ReleaseData(MANIFEST, tables)


EXPECTED = {
    ("trl-prm", "{}"): pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.bool_()))]),
    ("trl-prm", '{"labels": "soft"}'): pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())), ("labels", pa.list_(pa.float64()))]),
    ("trl-dpo", "{}"): pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]),
    ("trl-dpo", '{"style": "conversational"}'): pa.schema([(c, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))) for c in ("prompt", "chosen", "rejected")]),
    ("step-dpo", "{}"): pa.schema([(c, pa.string()) for c in ("dataset", "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer")]),
    ("math-shepherd", "{}"): pa.schema([("input", pa.string()), ("label", pa.string()), ("task", pa.string())]),
    # OpenAI's prm800k layout (question / label.steps[].completions[].rating / finish_reason) plus solution_id.
    ("prm800k", "{}"): pa.schema([
        ("labeler", pa.string()), ("is_quality_control_question", pa.bool_()), ("is_initial_screening_question", pa.bool_()),
        ("question", pa.struct([("problem", pa.string()), ("ground_truth_answer", pa.string())])),
        ("label", pa.struct([
            ("steps", pa.list_(pa.struct([
                ("completions", pa.list_(pa.struct([("text", pa.string()), ("rating", pa.int8()), ("flagged", pa.bool_())]))),
                ("human_completion", pa.string()), ("chosen_completion", pa.int32())]))),
            ("finish_reason", pa.string())])),
        ("solution_id", pa.string()),
    ]),
    ("rstar-ppm", "{}"): pa.schema([("prompt", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())), ("pos_count", pa.int32()), ("neg_count", pa.int32())]),
}


def _run(fmt, options=None):
    exporter = EXPORTERS[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoftLabelWarning)
        return exporter.fn(_data(), parse_options(fmt, options))


@pytest.mark.parametrize("fmt,opts", list(EXPECTED))
def test_export_has_the_exact_columns_and_types(fmt, opts):
    result = _run(fmt, json.loads(opts))
    assert result.table.schema.equals(EXPECTED[(fmt, opts)]), result.table.schema


def test_trl_prm_hard_labels_follow_the_first_error_in_step_order():
    rows = _run("trl-prm").table.to_pylist()
    assert rows == [
        {"prompt": "2+3*4?", "completions": ["3 * 4 = 12", "12 + 2 = 14"], "labels": [True, True]},
        {"prompt": "2+3*4?", "completions": ["2 + 3 = 5", "5 * 4 = 20"], "labels": [False, False]},
        {"prompt": "10-4?", "completions": ["10 - 4 = 6"], "labels": [True]},
    ]
    result = _run("trl-prm", {"threshold": 0.5})
    assert [r["labels"] for r in result.table.to_pylist()] == [[True, True], [False, False], [False]]
    assert result.stats["dropped_solutions_without_mc"] == 1


def test_trl_prm_soft_labels_warn_about_trl_int_cast():
    with pytest.warns(SoftLabelWarning, match="int\\(\\)"):
        result = EXPORTERS["trl-prm"].fn(_data(), parse_options("trl-prm", {"labels": "soft"}))
    assert result.table.to_pylist()[0]["labels"] == [0.75, 1.0] and result.warnings


def test_trl_prm_template_prompt_renders_the_manifest_template():
    rows = _run("trl-prm", {"prompt": "template"}).table.to_pylist()
    assert rows[0]["prompt"] == "Q: 2+3*4?\nA:\n"


def test_trl_dpo_prompt_holds_template_and_shared_prefix():
    rows = _run("trl-dpo").table.to_pylist()
    assert rows[0] == {"prompt": "Q: 2+3*4?\nA:\nStep 1: 3 * 4 = 12\n", "chosen": "Step 2: 12 + 2 = 14\n", "rejected": "Step 2: 12 + 2 = 15\n"}
    full = _run("trl-dpo", {"continuation": "full", "kinds": ["first_error"]}).table.to_pylist()
    assert full == [{"prompt": rows[0]["prompt"], "chosen": "Step 2: 12 + 2 = 14\n", "rejected": "Step 2: 12 + 2 = 15\nStep 3: The answer is 15.\n"}]
    conv = _run("trl-dpo", {"style": "conversational"}).table.to_pylist()[0]
    assert conv["prompt"] == [{"role": "user", "content": "Q: 2+3*4?\nA:\n"}]
    assert conv["chosen"] == [{"role": "assistant", "content": "Step 1: 3 * 4 = 12\nStep 2: 12 + 2 = 14\n"}]
    assert len(_run("trl-dpo", {"min_margin": 0.9}).table) == 1


def test_step_dpo_uses_the_published_column_set():
    rows = _run("step-dpo").table.to_pylist()
    assert rows == [{"dataset": "gsm8k", "prompt": "Q: 2+3*4?\nA:\n", "initial_reason_steps": "Step 1: 3 * 4 = 12\n",
                     "chosen": "Step 2: 12 + 2 = 14\n", "rejected": "Step 2: 12 + 2 = 15\n",
                     "full_chosen": "Step 2: 12 + 2 = 14\n", "full_rejected": "Step 2: 12 + 2 = 15\nStep 3: The answer is 15.\n",
                     "answer": "14"}]


def test_math_shepherd_replaces_each_tag_with_its_label():
    rows = _run("math-shepherd").table.to_pylist()
    assert rows[0]["input"] == "2+3*4? Step 1: 3 * 4 = 12 ки\nStep 2: 12 + 2 = 14 ки"
    assert rows[0]["label"] == "2+3*4? Step 1: 3 * 4 = 12 +\nStep 2: 12 + 2 = 14 +"
    assert rows[1]["label"].endswith("5 * 4 = 20 -") and rows[0]["task"] == "gsm8k"
    for r in rows:  # the label is the input with only each trailing tag swapped
        for inp, lab in zip(r["input"].split("\n"), r["label"].split("\n"), strict=True):
            assert inp.endswith(" ки") and lab[:-2] == inp[:-3] and lab[-2:] in (" +", " -")


def test_math_shepherd_quarantines_text_containing_the_tag_and_counts_it():
    problems = to_table("problems", _problems().to_pylist() + [
        {"problem_id": "p3", "source": "gsm8k", "domain": "math", "question": "what does ки mean?", "answer": "1",
         "header": None, "formal_statement": None, "metadata": "{}"}])
    steps = to_table("steps", _steps().to_pylist() + [_step("p1", "s9", 0, "fine", 4, 1), _step("p1", "s9", 1, "oops ки", 4, 1),
                                                      _step("p3", "s8", 0, "1", 4, 4)])
    result = EXPORTERS["math-shepherd"].fn(_data(steps=steps, problems=problems), parse_options("math-shepherd"))
    clean = _run("math-shepherd").table
    assert result.table.equals(clean)  # the two bad solutions are left out, every other row is unchanged
    assert result.stats["quarantined_step_tag"] == 2
    assert set(result.stats["quarantine"]) == {"steps[solution_id=s9, step_index=1]: step_text", "problems[problem_id=p3]: question"}
    assert result.warnings and "2 solution(s) left out" in result.warnings[0] and "ки" in result.warnings[0]
    for row in result.table.to_pylist():  # one tag per step, exactly
        assert row["input"].count("ки") == row["label"].count("\n") + 1


def test_math_shepherd_refuses_a_step_label_containing_the_tag():
    with pytest.raises(ConfigError, match="math-shepherd.step_label"):
        parse_options("math-shepherd", {"step_label": "ки {i}: "})


def test_prm800k_ratings_and_neutral_mapping():
    result = _run("prm800k")
    recs = result.jsonl
    s1 = recs[0]["label"]["steps"]
    assert [st["completions"][0]["rating"] for st in s1] == [0, 1]  # 3/4 is neutral, 4/4 positive
    assert recs[1]["label"]["finish_reason"] == "found_error" and len(recs[1]["label"]["steps"]) == 1
    assert recs[0]["question"] == {"problem": "2+3*4?", "ground_truth_answer": "14"}
    pos = _run("prm800k", {"neutral": 1}).jsonl
    assert [st["completions"][0]["rating"] for st in pos[0]["label"]["steps"]] == [1, 1]
    with pytest.raises(ConfigError, match="prm800k.neutral"):
        parse_options("prm800k", {"neutral": 2})


def test_rstar_ppm_groups_pairs_by_prefix():
    rows = _run("rstar-ppm").table.to_pylist()
    assert rows[0] == {"prompt": "Q: 2+3*4?\nA:\nStep 1: 3 * 4 = 12\n", "pos": ["Step 2: 12 + 2 = 14\n", "Step 2: 2 + 12 = 14\n"],
                       "neg": ["Step 2: 12 + 2 = 15\n"], "pos_count": 2, "neg_count": 1}
    assert len(rows) == 2


def test_chat_family_prompt_uses_the_manifest_chat_template():
    chat = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    manifest = {**MANIFEST, "config": {"prompt": {"family": "chat", "template": "Solve: {{ question }}", "chat_template": chat,
                                                  "system": "Be brief.", "step_format": {"separator": "\n", "label": None}}}}
    data = ReleaseData(manifest, {"problems": _problems(), "steps": _steps(), "pairs": _pairs()})
    row = EXPORTERS["trl-dpo"].fn(data, parse_options("trl-dpo")).table.to_pylist()[0]
    assert row["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSolve: 2+3*4?<|im_end|>\n"
                             "<|im_start|>assistant\n3 * 4 = 12\n")


def test_unknown_options_and_formats_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="trl-prm.treshold"):
        parse_options("trl-prm", {"treshold": 0.5})
    with pytest.raises(ConfigError, match="`format` must be one of"):
        parse_options("csv", {})
    with pytest.raises(StorageError, match=r"pairs\[pair_id=x\]: problem_id 'nope'"):
        EXPORTERS["trl-dpo"].fn(_data(pairs=to_table("pairs", [_pair("nope", [], "a", "b", "sibling", pair_id="x")])), parse_options("trl-dpo"))


def _commit(store):
    stage_shard(store, "demo", "b1", "s0", {"problems": _problems(), "steps": _steps(), "pairs": _pairs()})
    return commit_release(store, "demo", build_key="b1", shard_keys=["s0"], manifest_fields={"config": MANIFEST["config"], "seed": 7}, card="# c\n")


ALL_OPTIONS = {"trl-prm": {}, "trl-dpo": {}, "step-dpo": {}, "math-shepherd": {}, "prm800k": {"neutral": -1}, "rstar-ppm": {}}


def test_every_export_round_trips_through_datasets_and_is_recorded(tmp_path):
    from datasets import load_dataset

    store = open_store(str(tmp_path / "data"))
    _commit(store)
    for fmt, opts in ALL_OPTIONS.items():
        out = tmp_path / "out" / fmt
        record = run_export(store, "demo", 1, fmt, str(out), opts)
        ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
        direct = EXPORTERS[fmt].fn(ReleaseData(MANIFEST, {"problems": _problems(), "steps": _steps(), "pairs": _pairs()}), parse_options(fmt, opts))
        assert ds.column_names == direct.table.column_names and len(ds) == record["rows"] > 0
        assert ds[0] == direct.table.to_pylist()[0]
        card = (out / "README.md").read_text()
        assert "## Export options" in card and json.loads((out / "export.json").read_text())["options"] == record["options"]
    prm = [json.loads(line) for line in (tmp_path / "out" / "prm800k" / "train.jsonl").read_text().splitlines()]
    assert prm[0]["label"]["steps"][0]["completions"][0]["rating"] == -1  # neutral → −1 as asked
    recorded = {r["format"]: r["options"] for r in export_records(store, "demo", 1)}
    assert recorded["prm800k"]["neutral"] == -1 and set(recorded) == set(ALL_OPTIONS)


def test_export_to_s3_loads_with_datasets_storage_options(s3_root, tmp_path):
    from datasets import load_dataset

    store = open_store(s3_root)
    _commit(store)
    out_uri = s3_root + "-exports/trl-prm"
    run_export(store, "demo", 1, "trl-prm", out_uri, {})
    out_store = open_store(out_uri)
    ds = load_dataset("parquet", data_files=f"{out_uri}/data/*.parquet", split="train", storage_options=out_store.storage_options(),
                      cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == ["prompt", "completions", "labels"] and len(ds) == 3
    assert ds.features["labels"].feature.dtype == "bool"


def test_unestimated_steps_are_labelled_from_the_first_error_or_their_solution_is_dropped():
    from storage.exports.base import implied_hard_labels

    # OmegaPRM-like path: probes at steps 2 and 3 only; the search located the first error at step 3.
    assert implied_hard_labels([0, 0, 16, 16], [0, 0, 3, 0], 3) == [True, True, True, False]
    # Step 1 unestimated but below the first error (step 0 is estimated and wrong): bad.
    assert implied_hard_labels([4, 0], [0, 0], 0) == [False, False]
    # An estimated step keeps its own c > 0 label (Math-Shepherd's hard estimate).
    assert implied_hard_labels([4, 4], [0, 2], None) == [False, True]
    # Nothing estimated after an unestimated step and no first error: undecided.
    assert implied_hard_labels([4, 0], [2, 0], None) is None

    def step(sid, i, text, k, c, fe):
        row = _step("p1", sid, i, text, None, None)
        row.update(mc_k=k, mc_c=c if k else 0, mc_value=c / k if k else None, first_error_index=fe)
        return row

    steps = to_table("steps", [
        step("o1", 0, "3 * 4 = 12", 0, 0, 2), step("o1", 1, "12 + 2 = 14", 16, 5, 2),
        step("o1", 2, "14 + 1 = 15", 16, 0, 2),
        step("o2", 0, "3 * 4 = 12", 8, 8, None), step("o2", 1, "12 + 2 = 14", 0, 0, None),  # undecided
    ])
    data = _data(steps=steps)
    rows = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm")).table.to_pylist()
    assert rows == [{"prompt": "2+3*4?", "completions": ["3 * 4 = 12", "12 + 2 = 14", "14 + 1 = 15"],
                     "labels": [True, True, False]}]
    result = EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm"))
    assert result.stats["solutions_with_inferred_steps"] == 1 and result.stats["dropped_solutions_without_mc"] == 1
    assert EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"unestimated": "drop"})).table.num_rows == 0
    assert EXPORTERS["trl-prm"].fn(data, parse_options("trl-prm", {"threshold": 0.5})).table.num_rows == 0
    (ms,) = EXPORTERS["math-shepherd"].fn(data, parse_options("math-shepherd")).table.to_pylist()
    assert ms["label"].endswith("3 * 4 = 12 +\nStep 2: 12 + 2 = 14 +\nStep 3: 14 + 1 = 15 -")
    # PRM800K: the implied-good step has no MC value to rate +1, so it gets the neutral rating.
    (prm,) = EXPORTERS["prm800k"].fn(data, parse_options("prm800k")).table.to_pylist()
    assert [s["completions"][0]["rating"] for s in prm["label"]["steps"]] == [0, 0, -1]
    assert prm["label"]["finish_reason"] == "found_error"
    assert EXPORTERS["prm800k"].fn(data, parse_options("prm800k", {"unestimated": "drop"})).table.num_rows == 0


@pytest.mark.parametrize("fmt", ["trl-prm", "math-shepherd", "prm800k"])
def test_prm_exports_of_a_release_without_steps_are_empty_not_errors(fmt):
    from storage.schema import SCHEMAS

    result = EXPORTERS[fmt].fn(_data(steps=SCHEMAS["steps"].empty_table()), parse_options(fmt))
    assert result.table.num_rows == 0
