"""prefect.yaml: every deployment points at a real flow and its parameters fit that flow's signature."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from conftest import REPO
from storage.objectstore import StorageConfig


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
            params.update({k: {"ref": "x@v1", "storage": {"root": "./data"}}.get(k, "./data")
                           for k in trigger.get("parameters", {})})
        if params:
            flow.validate_parameters(params)  # raises on an unknown or ill-typed parameter
    nightly = next(d for d in spec["deployments"] if d["name"] == "build-nightly")
    assert nightly["schedules"][0]["cron"]
    assert load_flow_from_entrypoint(nightly["entrypoint"]).name == "build_dataset"


PAYLOADS = [
    {"dataset": "demo", "version": 3, "content_hash": "abc",
     "storage": {"root": "./data", "endpoint_url": None, "region": None, "profile": None, "credentials_block": None,
                 "catalog": None}},
    {"dataset": "demo", "version": 3, "content_hash": "abc",
     "storage": {"root": "s3://bucket/data", "endpoint_url": "http://minio:9000", "region": "eu-west-1",
                 "profile": None, "credentials_block": "aws-credentials/minio", "catalog": None}},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_publish_on_commit_renders_the_commit_event_into_valid_parameters(monkeypatch, payload):
    """Rendered with Prefect's own automation templating: an unset setting arrives as null, not "None"."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    publish = next(d for d in spec["deployments"] if d["name"] == "publish-on-commit")
    params = copy.deepcopy({**publish.get("parameters", {}), **publish["triggers"][0]["parameters"]})
    RunDeployment._upgrade_v1_templates(params)
    rendered = hydrate(params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": {"payload": payload}}))
    flow = load_flow_from_entrypoint(publish["entrypoint"])
    checked = flow.validate_parameters(rendered)
    assert checked["ref"] == "demo@v3"
    assert checked["storage"] == StorageConfig(**payload["storage"]), "the build's storage settings, whole"
    # Keys themselves have no parameter to travel in: only the block's name does.
    assert not {"aws_access_key_id", "aws_secret_access_key", "credentials", "token"} & set(flow.parameters.properties)


def trigger_payload_fields() -> set[str]:
    """The `event.payload.<field>` names the publish trigger reads (the commit event must carry them all)."""
    text = (REPO / "prefect.yaml").read_text()
    return set(re.findall(r"event\.payload\.(\w+)", text))
