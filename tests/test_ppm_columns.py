"""rstar-ppm column-wise (``ppm_columns``) against its per-prefix records (``rstar_ppm._records``) on random
pairs: strings whose code-point order differs from a naive one (astral characters, accents, case), values that
tie (0.0 and -0.0 included), steps on both sides, null prefixes, kinds filters and NaN values (the records'
path). Whatever the columns make must be the records exactly; on clean input they must make it."""

from __future__ import annotations

import math

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.exports.base import ReleaseData
from storage.exports.ppm_columns import ppm_columns
from storage.exports.rstar_ppm import RStarPPMOptions, _records
from storage.exports.stream import ProblemLookup
from storage.schema import SCHEMAS

STEP = st.sampled_from(["a", "b", "B", "é", "e\u0301", "€", "\U0001F600", "\uffff", "a b", "", "ки", "\x00", "ab"])
VALUE = st.sampled_from([None, 0.0, -0.0, 0.25, 0.5, 1.0, 1.0])
TEMPLATES = ["Q: {{ question }}\nA:\n{{ steps }}",  # its head is joined column-wise
             "{{ steps }} after {{ question }}"]  # steps not last: no head, the records' path
LABELS = ["Step {i}: ", ""]


@st.composite
def pair_tables(draw) -> tuple[ReleaseData, RStarPPMOptions, bool]:
    pids = [f"p{i}" for i in range(draw(st.integers(1, 4)))] + ["pé", "p\U0001F600"]
    known = draw(st.sets(st.sampled_from(pids), min_size=len(pids) - 1))
    nan = draw(st.integers(0, 9)) == 0
    rows = []
    for n in range(draw(st.integers(0, 30))):
        prefix = draw(st.one_of(st.none(), st.lists(STEP, max_size=3)))
        rows.append({"pair_id": f"x{n}", "problem_id": draw(st.sampled_from(pids)), "prompt": "unused",
                     "prefix_steps": prefix, "chosen": draw(STEP), "rejected": draw(STEP),
                     "chosen_value": math.nan if nan and n == 0 else draw(VALUE), "rejected_value": draw(VALUE),
                     "margin": None, "full_chosen": None, "full_rejected": None, "answer": None,
                     "kind": draw(st.sampled_from(["first_error", "sibling", "ranked", None])),
                     "group_id": None, "rank": None})
    problems = [{"problem_id": p, "source": "s", "domain": "math", "question": draw(st.sampled_from(["q", "Wie?", "ки"])),
                 "answer": "1", "solution": None, "split": None, "meta": "{}"} for p in sorted(known)]
    template = draw(st.sampled_from(TEMPLATES))
    manifest = {"dataset": "demo", "version": 1, "content_hash": "abc",
                "config": {"prompt": {"family": "completion", "template": template,
                                      "step_format": {"separator": "\n", "label": draw(st.sampled_from(LABELS))}}}}
    data = ReleaseData(manifest, {"pairs": pa.Table.from_pylist(rows, schema=SCHEMAS["pairs"]),
                                  "problems": pa.Table.from_pylist(problems, schema=SCHEMAS["problems"])})
    options = RStarPPMOptions(max_per_side=draw(st.integers(1, 3)),
                              kinds=draw(st.one_of(st.none(), st.lists(st.sampled_from(["first_error", "sibling", "ranked"])))))
    clean = not nan and template == TEMPLATES[0] and known == set(pids)
    return data, options, clean


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=pair_tables())
def test_ppm_columns_are_the_records(drawn):
    data, options, clean = drawn
    t = data.table("pairs")
    lookup = ProblemLookup(data.table("problems"))
    arrays = ppm_columns(t, options.kinds, options.max_per_side, data.renderer, lookup)
    if clean:
        assert arrays is not None
    if arrays is None:
        return
    from storage.exports.rstar_ppm import SCHEMA

    got = pa.Table.from_arrays([arrays[f.name] for f in SCHEMA], schema=SCHEMA) if len(arrays["prompt"]) else SCHEMA.empty_table()
    want = pa.Table.from_pylist(_records(t, data, options, lookup), schema=SCHEMA)
    assert got.to_pylist() == want.to_pylist()
    assert got.equals(want)
