"""What the Prefect UI shows of stepforge: form descriptions that survive its HTML rendering, and the build's
label-distribution image.

Prefect's V1 UI renders parameter descriptions as HTML, so `releases go to <root>/<dataset>/v<N>` showed
as "releases go to //v.". Descriptions therefore never hold text an HTML parser takes for a tag; the
browser test renders the real form in headless Chromium and keeps the screenshot as an artifact.
"""

from __future__ import annotations

import html
import importlib
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydantic import BaseModel

from conftest import REPO

PACKAGES = ("flows", "tasks", "storage", "verifiers")
ARTIFACTS = Path(os.environ.get("STEPFORGE_TEST_ARTIFACTS", REPO / "test-artifacts"))
# What an HTML tokenizer starts a tag, end tag, comment or processing instruction at: `<` then a letter,
# `/`, `!` or `?`. (`0 < p < 1` is text; `<root>` and `<<a*b=c>>` are not.)
TAG_START = re.compile(r"<[A-Za-z/!?]")


def _descriptions(schema: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("description", "title") and isinstance(value, str):
                yield path or "(top)", value
            else:
                yield from _descriptions(value, f"{path}.{key}" if path else key)
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _descriptions(value, f"{path}[{i}]")


def _project_models() -> list[type[BaseModel]]:
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}."):
            try:
                importlib.import_module(info.name)
            except ImportError:  # optional extras (vllm, ...) that are not installed
                continue
    seen, todo, out = set(), list(BaseModel.__subclasses__()), []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in PACKAGES:
            out.append(cls)
    return out


def test_the_tag_check_catches_what_the_ui_swallowed():
    assert TAG_START.search("Dataset name; releases go to <root>/<dataset>/v<N>.")
    assert TAG_START.search("equations like <<a*b=c>>")
    assert not TAG_START.search("only those with 0 < pass rate < 1 and k >= 1; a -> b")


def test_no_form_description_holds_html_tags():
    """Every description the UI renders (flow parameter schemas, as Prefect sends them) and every config
    model's field and docstring descriptions."""
    from flows.build import build_dataset
    from flows.fanout import build_shard
    from flows.mustard import mustard_dataset
    from flows.publish import publish_dataset

    schemas = {f"flow {f.name}": f.parameters.model_dump()
               for f in (build_dataset, build_shard, publish_dataset, mustard_dataset)}
    models = _project_models()
    assert len(models) >= 20  # the walk found the configs (sources, policies, searches, exporters, ...)
    schemas |= {f"model {m.__module__}.{m.__qualname__}": m.model_json_schema() for m in models
                if not m.__name__.startswith("_")}
    bad = [f"{where} {path}: {text!r}" for where, schema in schemas.items()
           for path, text in _descriptions(schema) if TAG_START.search(text)]
    assert not bad, "descriptions an HTML renderer would eat (rephrase without <...>):\n" + "\n".join(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _start_prefect_server(tmp_path: Path) -> tuple[subprocess.Popen, int, dict[str, str]]:
    """`prefect server start` with its UI on a free port: (process, port, environment pointing at it).

    The port is picked before the server binds it (the UI must be told its API URL first), so something else
    can take it in between: then the server says so and exits, and it is started again on another port."""
    import httpx

    for attempt in range(5):
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api, "PREFECT_API_URL": api}
        log = tmp_path / f"prefect-server-{attempt}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, start_new_session=True, stdout=out,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while server.poll() is None:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    return server, port, env
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                raise AssertionError(f"prefect server did not start: {log.read_text()[-2000:]}")
            time.sleep(1)
        # Prefect's own check ("Port N is already in use") or uvicorn's bind error, depending on timing.
        if "already in use" not in log.read_text().lower():
            raise AssertionError(f"prefect server exited: {log.read_text()[-2000:]}")
    raise AssertionError("no free port for the prefect server in 5 tries")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_build_form_renders_descriptions_in_a_real_browser(tmp_path):
    """A Prefect server with its UI (the test harness serves none), the build deployment registered,
    both UIs' run forms rendered by headless Chromium; the rendered text holds the description whole."""
    server, port, env = _start_prefect_server(tmp_path)
    try:
        register = ("from flows.build import build_dataset; "
                    "print(build_dataset.to_deployment('ui-check').apply())")
        deployment_id = subprocess.run([sys.executable, "-c", register], env={**env, "PYTHONPATH": str(REPO)},
                                       cwd=REPO, capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        rendered = {}
        for ui, base in (("v1", ""), ("v2", "/v2")):
            url = f"http://127.0.0.1:{port}{base}/deployments/deployment/{deployment_id}/run"
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--virtual-time-budget=20000",
                     "--window-size=1400,1400"]
            shot = ARTIFACTS / f"prefect-ui-{ui}-build-form.png"
            subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
            assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of the {ui} form"
            dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=180).stdout
            rendered[ui] = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        from flows.config import BuildConfig

        description = BuildConfig.model_fields["dataset"].description
        for ui, text in rendered.items():
            assert "Parameters" in text, f"the {ui} form did not render (see {ARTIFACTS})"
            # The rendered page shows the description as text, not swallowed or mangled as markup.
            assert " ".join(description.split()) in text, (ui, description)

        # The build's label-distribution artifact (a PNG embedded as a data URI in markdown) is shown as an
        # image by both UIs, not dropped by their markdown sanitising.
        make = ("from flows.plots import label_distribution_markdown; from tasks.stats import BuildStats; "
                "from prefect.artifacts import create_markdown_artifact; "
                "s = BuildStats(steps=30, by_index_steps={'0': 10, '1': 10, '2': 10}, "
                "by_index_positive={'0': 8, '1': 5, '2': 2}, by_index_mc_n={'0': 10, '1': 10, '2': 9}, "
                "by_index_mc_sum={'0': 6.0, '1': 3.5, '2': 1.0}); "
                "print(create_markdown_artifact(label_distribution_markdown(s, 'ui check'), key='ui-check-labels'))")
        artifact_id = subprocess.run([sys.executable, "-c", make], env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO,
                                     capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1]
        for ui, base in (("v1", ""), ("v2", "/v2")):
            url = f"http://127.0.0.1:{port}{base}/artifacts/artifact/{artifact_id}"
            shot = ARTIFACTS / f"prefect-ui-{ui}-label-distribution.png"
            subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
            assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of the {ui} artifact"
            dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=180).stdout
            assert re.search(r'<img[^>]+src="data:image/png;base64,iVBORw0KGgo', dom), f"{ui}: no image (see {shot})"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
