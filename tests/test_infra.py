"""infra/: the compose stack, the worker image and the Kubernetes worker pool agree with the code.

Docker and Kubernetes cannot run here, so these files are checked against what the code accepts: every
command parses with the real CLI parsers (stepforge's typer app, Prefect's cyclopts app) without running,
every environment variable handed to a stepforge container is one that stepforge, boto3, Prefect's
settings or huggingface_hub reads, and every URL points at a service and port that the stack defines.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from typer.main import get_command

from conftest import REPO

INFRA = REPO / "infra"
PACKAGES = ("flows", "tasks", "storage", "verifiers")
WORKER_IMAGE = "stepforge-worker:latest"


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / "worker.yaml").read_text()) if d]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- what the code accepts -------------------------------------------------------------------------

def parse_stepforge(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a `stepforge ...` command line with the real typer app (no command runs); raises a usage error
    on an unknown command or option."""
    from flows.cli import app

    cmd = get_command(app)
    ctx = cmd.make_context("stepforge", list(args))
    path = []
    while hasattr(cmd, "resolve_command"):  # a group (typer's groups are not click.Group subclasses)
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, rest = cmd.resolve_command(ctx, rest)
        if sub is None:
            raise ValueError(f"no such command {name!r}")
        path.append(name)
        cmd, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return " ".join(path), ctx.params


def parse_prefect(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a `prefect ...` command line with Prefect's own cyclopts app (no command runs)."""
    from prefect.cli._app import _app

    _, root, _ = _app.meta.parse_args(list(args), exit_on_error=False, print_error=False)  # --no-prompt etc.
    command, bound, _ = _app.parse_args(list(root.arguments.get("tokens", ())), exit_on_error=False,
                                        print_error=False)
    return command.__name__, dict(bound.arguments)


def parse_command(argv: list[str] | str) -> tuple[str, str, dict[str, Any]]:
    argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
    program, args = argv[0], argv[1:]
    if program == "stepforge":
        return (program, *parse_stepforge(args))
    if program == "prefect":
        return (program, *parse_prefect(args))
    raise AssertionError(f"a stepforge container runs {program!r}, which is neither stepforge nor prefect")


def env_names_in_code() -> set[str]:
    """Environment variables stepforge's own code and prefect.yaml read."""
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?\(|environ\[|getenv\(|_env_int\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    names |= set(re.findall(r"\{\{\s*\$([A-Z][A-Z0-9_]+)\s*\}\}", (REPO / "prefect.yaml").read_text()))
    # Backends read their key from the variable their config names (`policy.api_key_env=NAME`): a name the
    # stack's documented build settings give there is read, as long as the config accepts that setting.
    from flows.config import load_config

    for path in (INFRA / "README.md", INFRA / "docker-compose.yml"):
        for field, name in re.findall(r"(policy\.api_key_env)=([A-Z][A-Z0-9_]+)", path.read_text()):
            load_config(None, [f"{field}={name}", "policy.kind=openai", "policy.base_url=http://vllm:8000/v1",
                               "policy.model=m"])
            names.add(name)
    return names


def env_names_of_libraries() -> set[str]:
    """Variables the libraries stepforge hands its settings to read: boto3/botocore, Prefect, huggingface_hub."""
    import botocore.configprovider
    import botocore.credentials
    import inspect

    import huggingface_hub.constants
    import huggingface_hub.utils._auth
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    names = set(_get_settings_fields(Settings))
    for spec in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        env = spec[1]
        names |= set(env) if isinstance(env, (list, tuple)) else {env} if env else set()
    env_provider = botocore.credentials.EnvProvider
    names |= {env_provider.ACCESS_KEY, env_provider.SECRET_KEY, env_provider.TOKENS[0], env_provider.TOKENS[1]}
    hub_source = inspect.getsource(huggingface_hub.constants) + inspect.getsource(huggingface_hub.utils._auth)
    names |= set(re.findall(r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']""", hub_source))
    return names


def test_the_env_name_lists_are_real():
    """The lists these checks rely on hold what they should (a broken regex would make every check pass)."""
    code = env_names_in_code()
    assert {"AWS_ENDPOINT_URL", "STEPFORGE_ROOT", "STEPFORGE_HOME", "OPENAI_API_KEY", "HF_ENDPOINT"} <= code
    libs = env_names_of_libraries()
    assert {"PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "HF_TOKEN"} <= libs
    assert "STEPFORGE_ROOTS" not in code | libs and "PREFECT_API_URLS" not in libs


def test_the_parsers_refuse_what_the_clis_refuse():
    assert parse_command("prefect worker start --pool stepforge --type process")[1] == "start"
    assert parse_command("stepforge datasets list")[1] == "datasets list"
    for bad in ("prefect worker start --pool stepforge --bogus 1", "prefect workers start",
                "stepforge build --bogus", "stepforge no-such-command"):
        with pytest.raises(Exception):
            parse_command(bad)


# -- docker compose ----------------------------------------------------------------------------------

def _runs_stepforge(svc: dict[str, Any]) -> bool:
    build = svc.get("build") or {}
    return svc.get("image") == WORKER_IMAGE or build.get("dockerfile") == "infra/Dockerfile"


def _ports(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in svc.get("ports", []):
        host, container = str(spec).split(":")[-2:]
        out[int(container)] = int(host)
    return out


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_compose_has_the_whole_stack():
    services = compose()["services"]
    assert {"prefect-server", "postgres", "minio", "minio-init", "deploy", "worker", "vllm", "kimina"} <= set(services)
    assert services["vllm"]["profiles"] == ["gpu"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # The worker image is built once, from the repository root, with infra/Dockerfile.
    assert services["deploy"]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert services["worker"]["image"] == services["deploy"]["image"] == WORKER_IMAGE
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep!r}, which the stack does not define"


def test_compose_commands_are_real_cli_commands():
    services = compose()["services"]
    checked = 0
    for name, svc in services.items():
        if not _runs_stepforge(svc) and name != "prefect-server":
            continue
        program, command, params = parse_command(svc["command"])
        checked += 1
        if name == "worker":
            assert (program, command, params["worker_type"]) == ("prefect", "start", "process")
            pools = {d["work_pool"]["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
            assert pools == {params["work_pool_name"]}, "the worker must poll the pool prefect.yaml deploys to"
        if name == "serve":
            assert (program, command) == ("stepforge", "serve") and svc["profiles"] == ["serve"]
            assert params["prefect_file"].as_posix() == "/opt/stepforge/prefect.yaml"
        if name == "deploy":
            assert (program, command, params) == ("prefect", "deploy", {"deploy_all": True})
            assert svc["working_dir"] == "/opt/stepforge"  # where prefect.yaml is in the image
    assert checked >= 4


def test_compose_env_of_stepforge_containers_is_read_by_the_code():
    known = env_names_in_code() | env_names_of_libraries()
    services = compose()["services"]
    for name, svc in services.items():
        if _runs_stepforge(svc) or name == "prefect-server":
            env = svc.get("environment", {})
            unknown = sorted(set(env) - known)
            assert not unknown, f"compose service {name!r} sets {unknown}: nothing in stepforge or its libraries reads them"
    for line in (INFRA / "minio.env").read_text().splitlines():
        if line.startswith("export "):
            var = line.split()[1].split("=")[0]
            assert var in known, f"infra/minio.env exports {var}, which nothing reads"


def test_compose_urls_point_at_services_and_their_ports():
    services = compose()["services"]
    worker_env = services["worker"]["environment"]
    # Prefect API: the server's command listens where PREFECT_API_URL says.
    server_argv = shlex.split(services["prefect-server"]["command"])
    api = urlsplit(worker_env["PREFECT_API_URL"])
    assert api.hostname == "prefect-server" and api.path == "/api"
    assert api.port == int(_flag(server_argv, "--port")) and api.port in _ports(services["prefect-server"])
    # Object store: MinIO's S3 port, and the bucket minio-init creates is the one STEPFORGE_ROOT names.
    s3 = urlsplit(worker_env["AWS_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port in _ports(services["minio"])
    bucket = urlsplit(worker_env["STEPFORGE_ROOT"]).hostname
    assert f"local/{bucket}" in services["minio-init"]["entrypoint"]
    # MinIO's root user is the S3 identity the worker uses (same variable, same default).
    assert worker_env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert worker_env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    # vLLM listens on the port it publishes, and requires the key the policy backend sends.
    vllm_argv = shlex.split(services["vllm"]["command"])
    assert int(_flag(vllm_argv, "--port")) in _ports(services["vllm"])
    assert services["vllm"]["environment"]["VLLM_API_KEY"] == worker_env["OPENAI_API_KEY"]
    # Kimina listens (LEAN_SERVER_PORT) on the port it publishes.
    kimina = services["kimina"]
    assert int(kimina["environment"]["LEAN_SERVER_PORT"]) in _ports(kimina)
    # The host-side env file reaches the same ports.
    host_env = dict(re.findall(r"^export (\w+)=(.*)$", (INFRA / "minio.env").read_text(), re.M))
    assert urlsplit(host_env["PREFECT_API_URL"]).port == _ports(services["prefect-server"])[api.port]
    assert urlsplit(host_env["AWS_ENDPOINT_URL"]).port == _ports(services["minio"])[s3.port]
    assert host_env["AWS_ACCESS_KEY_ID"] in worker_env["AWS_ACCESS_KEY_ID"]  # the compose default
    assert host_env["STEPFORGE_ROOT"] == worker_env["STEPFORGE_ROOT"]


# -- the worker image ----------------------------------------------------------------------------------

def test_dockerfile_installs_stepforge_and_runs_a_real_worker():
    text = (INFRA / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    extras = re.search(r"^ARG EXTRAS=(\S*)", text, re.M).group(1)
    declared = set(pyproject()["project"]["optional-dependencies"])
    assert set(filter(None, extras.split(","))) <= declared, f"EXTRAS={extras} names extras pyproject.toml lacks"
    assert "dask" in extras.split(",")  # the image can run shards on a Dask cluster
    copied = {part.strip("./") for line in lines if line.startswith("COPY") for part in line.split()[1:-1]}
    assert set(PACKAGES) | {"pyproject.toml", "prefect.yaml"} <= copied, "the image must hold every package and prefect.yaml"
    home = re.search(r"STEPFORGE_HOME=(\S+)", text).group(1)
    assert re.search(rf"^WORKDIR {re.escape(home)}$", text, re.M)
    assert compose()["services"]["worker"]["environment"]["STEPFORGE_HOME"] == home
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    program, command, params = parse_command(cmd)
    assert (program, command, params["work_pool_name"]) == ("prefect", "start", "stepforge")
    assert re.search(r'pip install "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}" && pip check', text)


# -- Kubernetes ---------------------------------------------------------------------------------------------

def test_k8s_worker_pool_manifests_fit_together():
    docs = k8s_docs()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        by_kind.setdefault(doc["kind"], []).append(doc)
    namespace = by_kind["Namespace"][0]["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, f"{doc['kind']} outside the stepforge namespace"
    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    account = pod["serviceAccountName"]
    assert account in {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
    binding = by_kind["RoleBinding"][0]
    assert binding["subjects"][0]["name"] == account and binding["roleRef"]["name"] == by_kind["Role"][0]["metadata"]["name"]
    rules = {(g, r): set(rule["verbs"]) for rule in by_kind["Role"][0]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "watch", "delete"} <= rules[("batch", "jobs")] and "watch" in rules[("", "pods")]
    (container,) = pod["containers"]
    program, command, params = parse_command(container["command"])
    assert (program, command, params["worker_type"]) == ("prefect", "start", "kubernetes")
    configmap = by_kind["ConfigMap"][0]
    known = env_names_in_code() | env_names_of_libraries()
    assert not set(configmap["data"]) - known, "the ConfigMap sets variables nothing reads"
    refs = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
    assert ("configMapRef", configmap["metadata"]["name"]) in refs and ("secretRef", "stepforge-s3") in refs
    assert "kubectl -n stepforge create secret generic stepforge-s3" in (INFRA / "k8s" / "worker.yaml").read_text()
    assert "kubernetes" in pyproject()["project"]["optional-dependencies"]  # the worker type's package


def test_k8s_base_job_template_is_complete_and_matches_the_manifests():
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders and placeholders <= set(variables), f"undefined template variables: {placeholders - set(variables)}"
    docs = k8s_docs()
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    worker = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert variables["namespace"]["default"] == namespace
    assert variables["image"]["default"] == worker["image"]
    job_container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert job_container["envFrom"] == worker["envFrom"], "flow-run pods get the worker's settings and keys"
    prefect_kubernetes = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes (the `kubernetes` extra) not installed")
    # Prefect's own code renders the template into a Job manifest (what the worker does per flow run).
    config = asyncio.run(prefect_kubernetes.KubernetesWorkerJobConfiguration.from_template_and_values(template, {}))
    assert config.job_manifest["spec"]["template"]["spec"]["containers"][0]["image"] == worker["image"]
    assert config.namespace == namespace


def readme_commands(path: Path) -> list[str]:
    """`prefect ...` and `stepforge ...` command lines of a markdown file's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words: list[str] = []
            for word in [*lexer, ";"]:  # commands between shell operators (&&, |, &, ;)
                if word and set(word) <= set("&|;<>()"):
                    while words and "=" in words[0] and not words[0].startswith("-"):
                        words.pop(0)  # VAR=value prefixes
                    if words and words[0].removeprefix(".venv/bin/") in ("prefect", "stepforge"):
                        out.append(shlex.join([words[0].removeprefix(".venv/bin/"), *words[1:]]))
                    words = []
                else:
                    words.append(word)
    return out


@pytest.mark.parametrize("readme", ["infra/README.md", "README.md"])
def test_commands_in_the_readmes_parse(readme):
    commands = readme_commands(REPO / readme)
    assert len(commands) >= 8
    for line in commands:
        parse_command(line)  # raises on an unknown command or option
