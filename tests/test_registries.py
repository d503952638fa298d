"""One registry shape for every plug-in kind: the config unions, default tags and error paths come from the
registries; capabilities the engine asks about hold for what the algorithms really do; `policy_id(config)`
and the preflight `verify(config)` need no backend."""

from __future__ import annotations

import asyncio
from typing import get_args

import pytest

from flows.components import make_policy, policy_id, verify
from flows.config import BuildConfig, _PLUGINS, load_config
from storage.errors import ConfigError, SourceError
from tasks.policy.registry import BACKENDS
from tasks.search.registry import ALGORITHMS
from tasks.sources.registry import SOURCES
from tasks.sources.synthetic import SyntheticSourceConfig, load_synthetic
from tasks.stats import BuildStats
from verifiers.registry import VERIFIERS


def _domain_partners(section: str, name: str) -> dict:
    """The other plug-ins a domain-bound one needs (a Lean source wants the Lean verifier and a Lean policy
    stand-in): the first registered fit of each, so the record's tag alone still selects it."""
    from tasks.domains import DOMAINS

    if section == "source":
        domain = SOURCES[name].domain
    elif section == "policy":
        domain = BACKENDS[name].domain
    elif section == "verifier":
        domain = next(d.name for d in DOMAINS.values() if name in d.verifiers)
    else:
        return {}
    if domain in (None, "math"):
        return {}
    partners = {"source": {"kind": next(n for n, s in SOURCES.items() if s.domain == domain)},
                "verifier": {"kind": DOMAINS[domain].verifiers[0]},
                "policy": {"kind": next(n for n, b in BACKENDS.items() if b.domain == domain)}}
    partners.pop(section)
    partners["judge"] = {"enabled": False}  # the default judge (simulated) reads math solutions only
    return partners


@pytest.mark.parametrize("section", sorted(_PLUGINS))
def test_every_record_is_named_as_its_config_tag_and_the_config_accepts_it(section):
    registry, tag, default = _PLUGINS[section]
    assert default in registry
    for name, record in registry.items():
        assert record.name == name == record.config.model_fields[tag].default
        if not any(f.is_required() for f in record.config.model_fields.values()):  # the tag alone selects it
            data = {section: {tag: name}, **_domain_partners(section, name)}
            assert type(getattr(BuildConfig.model_validate(data), section)) is record.config


@pytest.mark.parametrize("section,registry", [("search", ALGORITHMS), ("source", SOURCES), ("policy", BACKENDS),
                                              ("verifier", {n: v for n, v in VERIFIERS.items() if v.role == "outcome"})])
def test_config_unions_hold_exactly_the_registered_configs(section, registry):
    assert set(get_args(BuildConfig.model_fields[section].annotation)) == {r.config for r in registry.values()}


def test_error_paths_drop_the_union_tag_users_never_typed():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["search.algorithm=omegaprm", "search.c_puct=-1"])
    assert exc.value.field == "search.c_puct" and "omegaprm" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # a field that is named like a tag keeps its name
        load_config(None, ["source.kind=file"])
    assert exc.value.field == "source.path"


def test_cross_field_errors_name_both_fields_and_fail_at_construction():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["policy.kind=openai", "policy.base_url=http://127.0.0.1:9/v1", "policy.model=m",
                           "policy.endpoint=chat"])
    assert exc.value.field == "policy.endpoint" and "`prompt.family=chat`" in str(exc.value)
    load_config(None, ["policy.kind=openai", "policy.base_url=http://127.0.0.1:9/v1", "policy.model=m",
                       "policy.endpoint=chat", "prompt.family=chat"])
    # No silent clamp: a budget below one estimate (k rollouts) is an error, not raised to k in secret.
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["search.algorithm=omegaprm", "search.rollout_budget=8"])
    assert exc.value.field == "search.rollout_budget" and "`search.k` (16)" in str(exc.value)


@pytest.mark.parametrize("moved", ["budget.enabled=true", "pairs.sibling.enabled=false"])
def test_budget_and_pairs_are_configured_once_beside_search(moved):
    section = moved.split(".")[0]
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"search.{moved}"])
    assert exc.value.field == f"search.{section}" and f"top-level `{section}`" in str(exc.value)
    cfg = load_config(None, ["search.algorithm=mcts", moved])
    assert getattr(cfg, section) is not None and "budget" not in cfg.search.model_dump()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_capabilities_match_what_each_algorithm_writes(name, make_engine):
    algo = ALGORITHMS[name]
    problems = load_synthetic(SyntheticSourceConfig(num_problems=3, seed=5)).problems
    cfg = algo.config()

    async def go():
        engine = make_engine()
        return [await algo.run_problem(engine, p, cfg) for p in problems]

    nodes = [n for res in asyncio.run(go()) for n in res.tree]
    if algo.rollouts_are_visits:  # the node value c/k is on [0, 1]
        assert all((n.visits, n.value_sum) == (n.rollouts, n.rollouts_correct) for n in nodes)
        assert not algo.reward_scaled
    else:  # backups of rewards in [-1, 1]
        assert algo.reward_scaled and any(n.value_sum < 0 for n in nodes)
    assert algo.budget_by_default == (name != "math-shepherd")
    per_problem = algo.budget_rollouts(cfg)
    assert per_problem is None or per_problem >= getattr(cfg, "k", 1)


def test_policy_id_needs_no_backend_and_equals_the_backends_own(tmp_path):
    for sets in ([], ["policy.kind=openai", "policy.base_url=http://127.0.0.1:9/v1", "policy.model=m"]):
        cfg = load_config(None, sets)
        assert policy_id(cfg) == make_policy(cfg).policy_id
    cfg = load_config(None, ["policy.kind=transformers", f"policy.model={tmp_path}/none"])
    assert policy_id(cfg).startswith(f"transformers/{tmp_path}/none@")  # no model was loaded to say so


def test_preflight_checks_store_and_source_before_any_flow(tmp_path):
    ok = verify(load_config(None, [f"storage.root={tmp_path}/data"]))
    assert (ok.source, ok.verifier) == ("synthetic", "outcome") and ok.policy.startswith("simulated-arith/")
    with pytest.raises(SourceError) as exc:
        verify(load_config(None, ["source.kind=file", f"source.path={tmp_path}/missing.jsonl"]))
    assert exc.value.field == "source.path"
    with pytest.raises(ConfigError) as exc:
        verify(load_config(None, ["storage.root=ftp://host/x"]))
    assert exc.value.field == "storage.root"


def test_build_stats_add_up_field_by_field():
    a = BuildStats(problems=2, steps=5, skipped={"all_wrong": 1}, by_index_mc_sum={"0": 0.5}, usage={"requests": 3})
    b = BuildStats(problems=3, steps=1, skipped={"all_wrong": 2, "undecided": 1}, by_index_mc_sum={"0": 0.25, "1": 1.0})
    total = BuildStats.total([a, b])
    assert (total.problems, total.steps) == (5, 6)
    assert total.skipped == {"all_wrong": 3, "undecided": 1} and total.usage == {"requests": 3}
    assert total.by_index_mc_sum == {"0": 0.75, "1": 1.0}
    assert BuildStats.from_dict({**total.to_dict(), "dataset": "demo"}) == total


def test_step_checks_and_the_judge_are_registry_records_and_their_config_unions_come_from_them():
    from flows.components import make_step_verifiers
    from flows.config import JudgeSection
    from tasks.policy.registry import JUDGE_BACKENDS
    from verifiers.registry import judges, step_checks

    for name, record in VERIFIERS.items():
        assert record.name == name == record.config.model_fields["kind"].default
    checks = {v.name for v in step_checks()}
    assert checks == {"arith-check", "code-check"} and [v.name for v in judges()] == ["judge"]
    (union,) = get_args(BuildConfig.model_fields["checks"].annotation)
    assert set(get_args(get_args(union)[0])) == {v.config for v in step_checks()}
    assert issubclass(JudgeSection, judges()[0].config)
    judge_policy = BuildConfig.model_fields["judge"].annotation.model_fields["policy"].annotation
    assert set(get_args(judge_policy)) == {b.config for b in JUDGE_BACKENDS.values()}
    assert set(JUDGE_BACKENDS) == {n for n, b in BACKENDS.items() if b.domain != "lean"} | {"simulated-judge"}
    assert "simulated-judge" not in BACKENDS, "the simulated judge writes no steps: it is no `policy` backend"
    # Built through the records: the checks in config order, the judge with its model.
    cfg = load_config(None, ["checks=[{kind: code-check}, {kind: arith-check}]"])
    built = make_step_verifiers(cfg)
    try:
        assert [c.name for c in built.checks] == ["code-check", "arith-check"]
        assert built.judge.name == "judge" and built.judge.policy.policy_id.startswith("simulated-judge/")
    finally:
        asyncio.run(built.aclose())
    assert make_step_verifiers(load_config(None, ["checks=[]", "judge.enabled=false"])).enabled is False


def test_error_paths_inside_checks_and_the_judge_model_drop_the_tag():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["checks=[{kind: code-check, timeout_s: -1}]"])
    assert exc.value.field == "checks.0.timeout_s" and "code-check.timeout_s" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["judge.policy.kind=openai"])
    assert exc.value.field == "judge.policy.base_url"


def test_preflight_checks_the_judge_backends_environment_like_the_policys(tmp_path, monkeypatch):
    monkeypatch.delenv("SF_TEST_JUDGE_KEY", raising=False)
    sets = [f"storage.root={tmp_path}/data", "judge.policy.kind=openai", "judge.policy.base_url=http://127.0.0.1:9/v1",
            "judge.policy.model=judge", "judge.policy.api_key_env=SF_TEST_JUDGE_KEY"]
    with pytest.raises(ConfigError) as exc:
        verify(load_config(None, sets))
    assert exc.value.field == "judge.policy.api_key_env" and exc.value.value == "SF_TEST_JUDGE_KEY"
    assert str(exc.value).startswith("`judge.policy.api_key_env`: the environment variable `SF_TEST_JUDGE_KEY` is not")
    assert "set `judge.policy.api_key_env` to null" in str(exc.value)
    assert not (tmp_path / "data").exists(), "nothing is made before the preflight passes"
    verify(load_config(None, [*sets, "judge.enabled=false"]))  # a judge that is off needs no key
    monkeypatch.setenv("SF_TEST_JUDGE_KEY", "sk-judge-secret-value")
    assert verify(load_config(None, sets)).verifier == "outcome"
