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


def test_publish_on_commit_passes_s3_settings_by_name_only(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    publish = next(d for d in spec["deployments"] if d["name"] == "publish-on-commit")
    params = publish["parameters"]
    assert {"credentials_block", "endpoint_url", "region"} <= set(params)
    flow = load_flow_from_entrypoint(publish["entrypoint"])
    # A block slug is accepted as the parameter; keys themselves have no parameter to travel in.
    checked = flow.validate_parameters({**params, "ref": "x@v1", "root": "s3://b/p", "credentials_block": "aws-credentials/minio"})
    assert checked["credentials_block"] == "aws-credentials/minio"
    assert not {"aws_access_key_id", "aws_secret_access_key", "token"} & set(flow.parameters.properties)
