"""A loopback stand-in for the Hub's HTTP API, so that the real `huggingface_hub` client runs in the tests.

It speaks what the client's push path asks for (huggingface_hub 2.4, with ``HF_HUB_DISABLE_XET=1``: the legacy
single-commit path; Xet storage is a separate protocol this server does not speak):

- ``POST /api/repos/create``: a repo in the caller's namespace (the token's user) unless one is given; an
  existing repo answers 409 with its url, as the Hub does (``create_repo(exist_ok=True)`` reads the id from it);
- ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (a README's metadata), ``GET /api/models/ID[/revision/R]``;
- ``POST /api/models/ID/preupload/REV``: each file's upload mode, chosen as the Hub does: LFS for large or binary
  files and for the suffixes the Hub's default ``.gitattributes`` tracks, regular for the rest;
- ``POST /ID.git/info/lfs/objects/batch``, then ``PUT`` of each LFS object (its sha256 checked) and its verify;
- ``POST /api/models/ID/commit/REV``: the NDJSON commit (base64 regular files, LFS pointers to uploaded objects).

Only 127.0.0.1, a port the OS picks; every request is recorded (method, path, headers, body) so a test can check
where the token travelled. Faults on demand: ``answer_500`` (every request matching a path fragment gets a 500),
``drop_commits`` (the commit's connection is closed after half its body is read: an upload cut mid-way), and
``drop_file`` (one path of a commit is acknowledged but not stored: the test of the byte-for-byte check). The
server stops itself after ``lifetime`` seconds, whatever the test does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".npy", ".h5", ".zip", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores a file this large through LFS whatever its type


@dataclass
class Request:
    method: str
    path: str  # with its query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    repo: str
    summary: str
    files: dict[str, bytes]  # what this commit stored, by path in the repo


@dataclass
class HubState:
    user: str
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> content
    commits: list[Commit] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    answer_500: tuple[str, ...] = ()  # path fragments answered with a 500 ("/" matches every request)
    drop_commits: bool = False
    drop_file: str | None = None
    faults_left: int | None = None  # how many more requests a fault above hits (None: every one)
    on_fault: Callable[[], None] | None = None  # called as a fault hits, before the answer (a test's snapshot)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HubHandler(BaseHTTPRequestHandler):
    server: HubHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the recorded requests say what happened
        pass

    def do_HEAD(self):
        self._handle("HEAD")

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    @property
    def state(self) -> HubState:
        return self.server.state

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        if self.state.drop_commits and method == "POST" and "/commit/" in path and self._fault():
            self._record(method, self._read_body(limit=max(1, int(self.headers.get("Content-Length") or 2) // 2)))
            self.close_connection = True  # no answer: the client sees the connection closed mid-upload
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self._read_body()
        self._record(method, body)
        if any(fragment in path for fragment in self.state.answer_500) and self._fault():
            return self._answer(500, {"error": "Internal Error (simulated)"})
        status, payload = self._route(method, unquote(path), body)
        self._answer(status, payload)

    def _fault(self) -> bool:
        """Whether a configured fault hits this request (its budget counts down), after the test's hook ran."""
        with self.state.lock:
            if self.state.faults_left is not None:
                if self.state.faults_left <= 0:
                    return False
                self.state.faults_left -= 1
        if self.state.on_fault is not None:
            self.state.on_fault()
        return True

    def _record(self, method: str, body: bytes) -> None:
        with self.state.lock:
            self.state.requests.append(Request(method, self.path, dict(self.headers.items()), body))

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(limit, length))

    def _answer(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self, method: str, path: str, body: bytes):
        endpoint = self.server.endpoint
        if path in ("", "/"):
            return 200, {}
        if path == "/api/whoami-v2":
            return 200, {"type": "user", "name": self.state.user, "auth": {"type": "access_token"}}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body))
        if path.startswith("/lfs-upload/") and method == "PUT":
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": f"sha256 of the uploaded object is not {oid}"}
            with self.state.lock:
                self.state.lfs[oid] = body
            return 200, None
        if path.startswith("/lfs-verify/"):
            known = json.loads(body).get("oid") in self.state.lfs
            return (200, {}) if known else (404, {"error": "object not uploaded"})
        if path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch"), body, endpoint)
        if path.startswith("/api/models/"):
            return self._repo_route(method, path.removeprefix("/api/models/"), body)
        return 404, {"error": f"not served by the loopback Hub: {method} {path}"}

    def _create_repo(self, payload: dict):
        repo = f"{payload.get('organization') or self.state.user}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo}"
        with self.state.lock:
            if repo in self.state.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.state.repos[repo] = {}
        return 200, {"url": url, "name": repo, "id": repo}

    def _repo_route(self, method: str, rest: str, body: bytes):
        for action in ("/preupload/", "/commit/", "/revision/"):
            if action in rest:
                repo, _ = rest.split(action, 1)
                break
        else:
            repo, action = rest, ""
        if repo not in self.state.repos:
            return 404, {"error": "Repository not found"}
        if action == "/preupload/":
            files = json.loads(body)["files"]
            return 200, {"files": [self._upload_mode(item) for item in files]}
        if action == "/commit/" and method == "POST":
            return self._commit(repo, body)
        siblings = [{"rfilename": name} for name in sorted(self.state.repos[repo])]
        return 200, {"id": repo, "sha": self._head(repo), "siblings": siblings, "private": False}

    def _upload_mode(self, item: dict) -> dict:
        sample = base64.b64decode(item["sample"])
        lfs = item["size"] >= LFS_MIN_SIZE or item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample
        return {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None}

    def _lfs_batch(self, repo: str, body: bytes, endpoint: str):
        if repo not in self.state.repos:
            return 404, {"error": "Repository not found"}
        objects = [
            {
                "oid": item["oid"],
                "size": item["size"],
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{endpoint}/lfs-upload/{item['oid']}"},
                    "verify": {"href": f"{endpoint}/lfs-verify/{item['oid']}"},
                },
            }
            for item in json.loads(body)["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def _commit(self, repo: str, body: bytes):
        summary, stored = "", {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                stored[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                stored[value["path"]] = self.state.lfs[value["oid"]]
            else:
                return 400, {"error": f"commit operation {item['key']!r} not served by the loopback Hub"}
        stored.pop(self.state.drop_file or "", None)  # the test of the test: acknowledged, not stored
        with self.state.lock:
            self.state.repos[repo].update(stored)
            self.state.commits.append(Commit(repo, summary, stored))
        oid = self._head(repo)
        return 200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/{oid}", "commitOid": oid}

    def _head(self, repo: str) -> str:
        count = sum(commit.repo == repo for commit in self.state.commits)
        return hashlib.sha1(f"{repo}@{count}".encode()).hexdigest()


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = state
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class LoopbackHub:
    """``with LoopbackHub() as hub:`` serves at ``hub.endpoint`` until the block ends or ``lifetime`` runs out."""

    def __init__(self, user: str = "someone", lifetime: float = 900.0):
        self.state = HubState(user=user)
        self.server = HubHTTPServer(self.state)
        self.endpoint = self.server.endpoint
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def env(self, base: dict[str, str], token: str) -> dict[str, str]:
        """An environment for a process that pushes here: the Hub online (``HF_HUB_OFFLINE`` unset), its endpoint
        this server, the legacy upload path (no Xet), and ``token`` as the login."""
        env = {key: value for key, value in base.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN_PATH")}
        return {**env, "HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token}

    def files(self, repo: str) -> dict[str, bytes]:
        return dict(self.state.repos.get(repo, {}))

    def heal(self) -> None:
        """Answer every request normally again (the faults off)."""
        self.state.answer_500, self.state.drop_commits, self.state.drop_file = (), False, None


def promised_files(folder: Path) -> dict[str, bytes]:
    """What README.md and docs/logging.md promise a finished run's push uploads: every file of the folder but the
    checkpoints (optimizer, scheduler, RNG states), dotfiles (the folder's lock), ``training_args.bin`` and the
    offline downstream suite's third-party items (any ``offline_tasks`` folder)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not path.relative_to(folder).parts[0].startswith("checkpoint-")
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.name != "training_args.bin"
        and "offline_tasks" not in path.relative_to(folder).parts
    }


def assert_holds_exactly(hub: LoopbackHub, repo: str, expected: dict[str, bytes]) -> None:
    """The repo on the server holds exactly ``expected``: the same paths, each byte for byte."""
    stored = hub.files(repo)
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    assert not missing and not extra, f"missing on the server: {missing}; on the server, not promised: {extra}"
    for path, data in expected.items():
        assert stored[path] == data, f"{path}: {len(stored[path])} bytes on the server, {len(data)} on disk"


def assert_token_only_authenticates(hub: LoopbackHub, token: str) -> None:
    """The token travelled only as ``Authorization: Bearer <token>`` to this server: never in a url, another
    header, a request body or a stored file. At least one request carried it (the check is not vacuous)."""
    encoded = token.encode()
    authenticated = 0
    for request in hub.state.requests:
        assert token not in request.path, f"token in the url of {request.method} {request.path}"
        assert encoded not in request.body, f"token in the body of {request.method} {request.path}"
        for name, value in request.headers.items():
            if token in value:
                assert name.lower() == "authorization" and value == f"Bearer {token}", (name, request.path)
                authenticated += 1
    assert authenticated > 0, "no request carried the token: the server saw no authenticated push"
    for repo in hub.state.repos:
        for path, data in hub.files(repo).items():
            assert encoded not in data, f"token inside the pushed file {repo}/{path}"
