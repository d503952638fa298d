"""BuildConfig: YAML + --set overrides, field-named errors, the hash that keys caches, the UI form."""

from __future__ import annotations

import pytest

from flows.config import BuildConfig, load_config
from storage.errors import ConfigError


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: base\nsearch:\n  k: 4\nsource:\n  num_problems: 10\n")
    cfg = load_config(path, ["search.k=8", "dataset=foo", "storage.root=s3://bucket/pre", "seed=3"])
    assert (cfg.dataset, cfg.search.k, cfg.source.num_problems, cfg.seed) == ("foo", 8, 10, 3)
    assert cfg.search.algorithm == "math-shepherd" and cfg.source.kind == "synthetic"
    assert cfg.storage.root == "s3://bucket/pre"


@pytest.mark.parametrize("overrides, field", [
    (["search.k=0"], "search.k"),
    (["source.min_steps=9", "source.max_steps=4"], "source"),
    (["policy.latency_s=-1"], "policy.latency_s"),
    (["generation.temperature=hot"], "generation.temperature"),
    (["verifier.workers=0"], "verifier.workers"),
    (["nonsense=1"], "nonsense"),
    (["search.k"], "search.k"),
])
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"`{field}`" in str(info.value) or info.value.field == field


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_build_key_ignores_where_and_how_fast_but_not_what():
    base = BuildConfig()
    assert base.build_key() == load_config(None, ["storage.root=/elsewhere", "concurrency.shards=8",
                                                  "policy.latency_s=0.5", "dataset=other"]).build_key()
    assert base.build_key() != load_config(None, ["search.k=8"]).build_key()
    assert base.build_key() != load_config(None, ["seed=1"]).build_key()


def test_the_flow_parameter_is_the_config_model():
    from prefect.utilities.callables import parameter_schema

    from flows.build import build_dataset

    schema = parameter_schema(build_dataset.fn).model_dump()
    assert list(schema["properties"]) == ["config"]
    assert {"BuildConfig", "SyntheticSourceConfig", "MathShepherdConfig", "StorageConfig"} <= set(schema["definitions"])


def test_a_step_label_mode_without_a_findable_label_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompt.step_format.mode=step-label", "prompt.step_format.label=null"])
    assert "`prompt.step_format`" in str(info.value) and "mode=separator" in str(info.value)
    assert load_config(None, ["prompt.step_format.mode=step-label"]).prompt.step_format.label == "Step {i}: "


def test_a_label_with_an_unknown_placeholder_is_a_field_error_not_a_crash():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompt.step_format.mode=step-label", "prompt.step_format.label='Step {n}: '"])
    assert "`prompt.step_format`" in str(info.value) and "{i}" in str(info.value)


def test_a_base_url_without_scheme_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["policy.kind=openai", "policy.base_url=sk-SECRET123@host:8000/v1", "policy.model=m"])
    assert "`policy.base_url`" in str(info.value) and "SECRET123" not in str(info.value)
