"""prefect.yaml: every deployment points at a real flow and its parameters fit that flow's signature."""

from __future__ import annotations

import yaml
from prefect.flows import load_flow_from_entrypoint

from conftest import REPO


def test_deployments_resolve_to_flows_with_valid_parameters(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"build-on-demand", "build-nightly", "publish-on-commit"} <= names
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        params = dict(dep.get("parameters", {}))
        for trigger in dep.get("triggers", []):
            assert trigger["expect"] == ["stepforge.version.committed"]
            params.update({k: "x@v1" if k == "ref" else "./data" for k in trigger.get("parameters", {})})
        if params:
            flow.validate_parameters(params)  # raises on an unknown or ill-typed parameter
    nightly = next(d for d in spec["deployments"] if d["name"] == "build-nightly")
    assert nightly["schedules"][0]["cron"]
    assert load_flow_from_entrypoint(nightly["entrypoint"]).name == "build_dataset"
