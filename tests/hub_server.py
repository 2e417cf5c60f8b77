"""A small stand-in for the Hub's HTTP API, for tests: point HF_ENDPOINT at it. It records every request, creates
model repos, checks model cards' YAML, accepts commits whose files come inline (it answers "regular" to every
preupload, so nothing goes to LFS or Xet storage) and whose deletions name files or folders, and serves the repo's
info and its committed files back to `snapshot_download`, `hf_hub_download` and diffusers' `from_pretrained`. Private
repos answer 401 to a request without a token and gated ones 403, as the Hub does; a revision is "main" or a commit
id it has made."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []  # method, path, headers, body (bytes)
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> {path: content} at the last commit
        self.commits: list[dict] = []  # repo, summary, files (paths), deleted (paths as sent)
        self.private: set[str] = set()  # repos that need a token (any) to be read
        self.gated: set[str] = set()  # repos whose terms nobody has accepted
        self.shas: set[str] = set()  # the commit ids made so far, each a revision
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def sha(self, repo: str) -> str:
        """A commit id that changes with every commit."""
        return hashlib.sha1(f"{repo} {len(self.commits)}".encode()).hexdigest()

    def denied(self, repo: str, headers) -> tuple[int, dict, dict] | None:
        """The Hub's answer to a request for `repo` that may not read it: (status, body, headers), else None."""
        if repo not in self.repos or (repo in self.private and not headers.get("authorization")):
            return (
                401 if repo in self.repos else 404,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound"},
            )
        if repo in self.gated:
            return 403, {"error": f"Access to model {repo} is restricted"}, {"X-Error-Code": "GatedRepo"}
        return None

    def commit(self, repo: str, summary: str, files: dict[str, bytes], deleted: list[str]) -> str:
        """Apply a commit: deletions first (a path ending with '/' is a folder), then the files; its id."""
        with self.lock:
            content = self.repos[repo]
            for path in deleted:
                for name in [n for n in content if n == path or (path.endswith("/") and n.startswith(path))]:
                    del content[name]
            content.update(files)
            self.commits.append(dict(repo=repo, summary=summary, files=sorted(files), deleted=deleted))
            sha = self.sha(repo)
            self.shas.add(sha)
        return sha

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body=b"", headers=None, head=False):
                if isinstance(body, (dict, list)):
                    body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _record(self) -> tuple[str, bytes]:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    hub.requests.append(dict(method=self.command, path=path, headers=dict(self.headers), body=body))
                return path, body

            def do_POST(self):
                path, body = self._record()
                if path == "/api/repos/create":
                    spec = json.loads(body)
                    repo = f"{spec.get('organization') or 'someone'}/{spec['name']}"
                    hub.repos.setdefault(repo, {})
                    if spec.get("private"):
                        hub.private.add(repo)
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":  # the card's metadata must be a YAML mapping
                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                    except yaml.YAMLError as e:
                        return self._reply(400, {"error": str(e)})
                    ok = isinstance(meta, dict)
                    return self._reply(200 if ok else 400, {"errors": [] if ok else ["no metadata"], "warnings": []})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in json.loads(body)["files"]
                    ]
                    return self._reply(200, {"files": files})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                    repo = m.group(1)
                    if refused := hub.denied(repo, self.headers):
                        return self._reply(*refused)
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files, deleted = {}, []
                    for line in lines:
                        if line["key"] == "file":
                            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        elif line["key"] in ("deletedFile", "deletedFolder"):
                            path = line["value"]["path"]
                            deleted.append(path.rstrip("/") + "/" if line["key"] == "deletedFolder" else path)
                        elif line["key"] != "header":
                            return self._reply(400, {"error": f"unsupported commit item {line['key']}"})
                    summary = next(line["value"]["summary"] for line in lines if line["key"] == "header")
                    sha = hub.commit(repo, summary, files, deleted)
                    return self._reply(
                        200, {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
                    )
                return self._reply(404, {"error": f"no route {path}"})

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                path, _ = self._record()
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):  # model_info
                    repo, revision = m.groups()
                    if refused := hub.denied(repo, self.headers):
                        return self._reply(*refused)
                    if revision is not None and revision not in ("main", *hub.shas):
                        error = {"error": f"Invalid rev id: {revision}"}
                        return self._reply(404, error, {"X-Error-Code": "RevisionNotFound"})
                    siblings = [{"rfilename": name} for name in sorted(hub.repos[repo])]
                    return self._reply(200, {"id": repo, "modelId": repo, "sha": hub.sha(repo), "siblings": siblings})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                    repo = m.group(1)
                    if refused := hub.denied(repo, self.headers):
                        return self._reply(*refused)
                    tree = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(hub.repos.get(repo, {}).items())
                    ]
                    return self._reply(200, tree)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    repo, name = m.group(1), m.group(3)
                    if refused := hub.denied(repo, self.headers):
                        return self._reply(*refused, head=head)
                    data = hub.repos.get(repo, {}).get(name)
                    if data is None:
                        return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    headers = {"X-Repo-Commit": hub.sha(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                    return self._reply(200, data, headers, head=head)
                return self._reply(404, {"error": f"no route {path}"})

        return Handler
