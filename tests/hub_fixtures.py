"""A fake Hugging Face Hub on loopback: the few HTTP endpoints `huggingface_hub` calls to create a dataset
repo, upload a folder in one commit and tag it, plus the
reads made before (repo info with its visibility, the repo's refs). It records every request so tests can check the upload
at the HTTP layer (paths, payloads, Authorization) and rebuild the uploaded files."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHub:
    url: str
    requests: list[Recorded] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id → {"private", "files", "tags", "commits"}

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    def add_repo(self, repo_id: str, *, private: bool = False, tags: dict[str, str] | None = None) -> dict[str, Any]:
        """A repo that existed before the test (e.g. created public by hand on the Hub)."""
        self.repos[repo_id] = {"visibility": "private" if private else "public", "type": "dataset", "files": {},
                               "tags": dict(tags or {}), "commits": list((tags or {}).values())}
        return self.repos[repo_id]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _record(self) -> Recorded:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            hub.requests.append(rec)
            return rec

        def _not_found(self, what: str) -> None:
            # As the real Hub: huggingface_hub maps this header to RepositoryNotFoundError.
            body = json.dumps({"error": f"{what} not found"}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._record()
            path = self.path.split("?", 1)[0]
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/refs)?", path)
            if m:
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._not_found(f"dataset repo {m.group(1)}")
                head = repo["commits"][-1] if repo["commits"] else "0" * 40
                if m.group(2):  # list_repo_refs
                    return self._reply(200, {
                        "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}], "converts": [],
                        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo["tags"].items()]})
                return self._reply(200, {"id": m.group(1), "private": repo["visibility"] == "private", "sha": head,
                                         "siblings": [{"rfilename": f} for f in sorted(repo["files"])]})
            self._reply(404, {"error": f"fake hub: no route for GET {self.path}"})

        def do_HEAD(self) -> None:  # noqa: N802
            self._record()
            self.send_response(404)
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            rec = self._record()
            path = self.path.split("?", 1)[0]
            if path == "/api/repos/create":
                data = json.loads(rec.body)
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                if repo_id in hub.repos:  # as the real Hub: a conflict, which create_repo(exist_ok=True) accepts
                    return self._reply(409, {"error": "You already created this dataset repo", "url": f"{hub.url}/datasets/{repo_id}"})
                hub.repos[repo_id] = {"visibility": data.get("visibility"), "type": data.get("type"), "files": {}, "tags": {}, "commits": []}
                return self._reply(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(rec.body))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(preupload|commit|tag)/(.+)", path)
            if not m or m.group(1) not in hub.repos:
                return self._reply(404, {"error": f"fake hub: no route for POST {self.path}"})
            repo = hub.repos[m.group(1)]
            if m.group(2) == "preupload":
                files = json.loads(rec.body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if m.group(2) == "commit":
                for line in rec.body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        repo["files"][value["path"]] = base64.b64decode(value["content"])
                oid = hashlib.sha1(rec.body).hexdigest()
                repo["commits"].append(oid)
                return self._reply(200, {"commitUrl": f"{hub.url}/datasets/{m.group(1)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
            data = json.loads(rec.body or b"{}")
            if data["tag"] in repo["tags"]:  # as the real Hub: a tag is never moved
                return self._reply(409, {"error": f"Tag {data['tag']} already exists"})
            repo["tags"][data["tag"]] = m.group(3)
            return self._reply(200, {})

        def _validate_yaml(self, data: dict[str, Any]) -> None:
            # The checks the real Hub makes on a dataset card that matter here: parseable front matter, and
            # `configs` entries with a name and data files.
            import yaml

            content = data.get("content", "")
            errors = []
            if not content.startswith("---\n"):
                errors.append({"message": "no YAML front matter"})
            else:
                meta = yaml.safe_load(content.split("---\n", 2)[1]) or {}
                for c in meta.get("configs", []):
                    if not c.get("config_name") or not c.get("data_files"):
                        errors.append({"message": f"config without name or data_files: {c}"})
            return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})

    return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    hub = FakeHub(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
