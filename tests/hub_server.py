"""Hub-compatible HTTP servers on 127.0.0.1 for the download tests.

`HubStub` is a stdlib ThreadingHTTPServer that answers the endpoints huggingface_hub calls
(model info, recursive tree, auth-check, HEAD/GET resolve) the way huggingface.co does,
including gated answers (401/403 + X-Error-Code: GatedRepo), RepoNotFound, RevisionNotFound,
an LFS redirect to a second "CDN" server on another port (so the client must drop the token),
and HTTP Range. Failures are injected per file: a connection cut mid-body, a corrupted body,
a 503. Every request is recorded so tests can assert what the client did.

`HubStub.hostile` turns the stub into a hostile mirror, per route ("info", "tree", "auth",
"resolve", "cdn"): a (mode, argument) pair answers that route instead of the normal handler
(see `_Handler._hostile` for the modes: hang, trickle, redirect loops, raw or replaced JSON,
lazily generated huge listings, endless pagination, bodies longer or shorter than listed).

`OlahServer` runs the `olah` mirror (offline mode) over local git repositories whose LFS
objects are laid out as git-lfs would, without needing the git-lfs binary.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_MIN_SIZE = 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StubRepo:
    """A model repository at one commit; files of LFS_MIN_SIZE bytes or more are stored in LFS."""

    repo_id: str
    files: dict[str, bytes]
    card: dict[str, Any] | None = None
    gated: bool = False
    approved: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)

    @property
    def commit(self) -> str:
        h = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        return h.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_MIN_SIZE

    def tree(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        dirs = sorted({str(p) for path in self.files for p in Path(path).parents if str(p) != "."})
        for d in dirs:
            entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        for path, data in sorted(self.files.items()):
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if self.is_lfs(path):
                sha = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
                entry.update(oid=git_blob_sha1(pointer.encode()), size=len(pointer),
                             lfs={"oid": sha, "size": len(data), "pointerSize": len(pointer)})
            entries.append(entry)
        return entries


@dataclass
class Seen:
    server: str  # hub | cdn
    method: str
    path: str
    range: str | None
    authorization: str | None


class HubStub:
    """The Hub API + resolve server and its LFS "CDN", both on 127.0.0.1 with ephemeral ports."""

    def __init__(self, repos: list[StubRepo], *, tokens: set[str] | None = None) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.tokens = set(tokens or set())
        for r in repos:
            self.tokens |= r.approved | r.pending | r.rejected
        self.requests: list[Seen] = []
        self.cut_after: dict[str, int] = {}  # path -> bytes of body sent before the connection is cut (once)
        self.corrupt: dict[str, int] = {}  # path -> how many more bodies to corrupt
        self.fail: dict[str, int] = {}  # path -> how many more 503 answers
        self.hostile: dict[str, tuple[str, Any]] = {}  # route -> (mode, argument), see _Handler._hostile
        self.stopping = threading.Event()  # releases handlers that "hang"
        self.pages_served = 0
        self._lock = threading.Lock()
        self._hub = self._server("hub")
        self._cdn = self._server("cdn")
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> HubStub:
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def seen(self, server: str | None = None, method: str | None = None, contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if (server is None or s.server == server)
                    and (method is None or s.method == method) and contains in s.path]

    def _server(self, role: str) -> ThreadingHTTPServer:
        stub = self

        class Handler(_Handler):
            pass

        Handler.stub, Handler.role = stub, role
        srv = _QuietServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def _take(self, table: dict[str, int], path: str) -> bool:
        with self._lock:
            if table.get(path, 0) > 0:
                table[path] -= 1
                return True
            return False


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is what the hostile modes provoke: no traceback on stderr."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: HubStub
    role: str

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return None

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    # --- helpers -------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        return auth.split(" ", 1)[1] if auth and auth.lower().startswith("bearer ") else None

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               method: str = "GET") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: object, method: str, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, method)

    def _error(self, status: int, code: str | None, message: str, method: str, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, method, headers)

    def _route(self, method: str) -> None:
        stub = self.stub
        path = urlsplit(self.path).path
        with stub._lock:
            stub.requests.append(Seen(self.role, method, path, self.headers.get("Range"),
                                      self.headers.get("Authorization")))
        token = self._token()
        if token is not None and token not in stub.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header", method)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        route = _route_name(self.role, parts)
        if route in stub.hostile and self._hostile(route, *stub.hostile[route], method):
            return None
        if self.role == "cdn":
            if len(parts) == 2 and parts[0] == "lfs-cdn":
                return self._cdn_object(parts[1], method)
            return self._error(404, None, "Not found", method)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2] + "/" + parts[3], parts[4:], method, token)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), method, token)
        return self._error(404, None, "Not found", method)

    def _repo(self, repo_id: str, method: str, token: str | None) -> StubRepo | None:
        repo = self.stub.repos.get(repo_id)
        if repo is None:  # huggingface.co: 401 when anonymous (could be private), 404 with a token
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found", method)
        return repo

    def _revision_ok(self, repo: StubRepo, rev: str, method: str) -> bool:
        if rev in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", method)
        return False

    def _gate(self, repo: StubRepo, token: str | None, method: str) -> bool:
        """huggingface.co's answers for a gated repository, by the state of the token's access request."""
        if not repo.gated or (token is not None and token in repo.approved):
            return True
        rid = repo.repo_id
        if token is None:
            status, msg = 401, (f"Access to model {rid} is restricted. You must have access to it and be "
                                "authenticated to access it. Please log in.")
        elif token in repo.pending:
            status, msg = 403, f"Your request to access model {rid} is awaiting a review from the repo authors."
        elif token in repo.rejected:
            status, msg = 403, f"Your request to access model {rid} has been rejected by the repo's authors."
        else:
            status, msg = 403, (f"Access to model {rid} is restricted and you are not in the authorized list. "
                                f"Visit {self.stub.url}/{rid} to ask for access.")
        self._error(status, "GatedRepo", msg, method)
        return False

    # --- a hostile mirror ----------------------------------------------------------------------

    def _hostile(self, route: str, mode: str, arg: Any, method: str) -> bool:
        """Answer `route` as a hostile mirror would; False to answer normally (body modes on HEAD).

        hang: accept and never answer. trickle: `arg` bytes, one every 0.25 s. redirect-loop: 302
        to the same URL. redirect: 302 to `arg`. raw: 200 with the bytes `arg`. json: 200 with `arg`
        as JSON. status: (code, body, headers). listing: `arg` tree entries generated lazily, no
        Content-Length. pages: endless pagination, `arg` entries a page. body: GET answered with the
        bytes `arg` (HEAD normal). endless: GET answered with bytes until the client hangs up.
        stall-body: GET headers announcing `arg` bytes, then nothing.
        """
        body_modes = {"body", "endless", "stall-body"}
        if mode in body_modes and method != "GET":
            return False
        if mode in ("hang", "stall-body"):
            if mode == "stall-body":
                self.send_response(200)
                self.send_header("Content-Length", str(arg))
                self.end_headers()
                self.wfile.flush()
            self.stub.stopping.wait(120)
            self.close_connection = True
        elif mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(arg)))
            self.end_headers()
            for i in range(len(arg)):
                if self.stub.stopping.wait(0.25):
                    break
                self._send(arg[i:i + 1])
        elif mode in ("redirect-loop", "redirect"):
            self._reply(302, b"", {"Location": self.path if mode == "redirect-loop" else arg}, method)
        elif mode in ("raw", "json", "body"):
            data = json.dumps(arg).encode() if mode == "json" else arg
            self._reply(200, data, {"Content-Type": "application/json"}, method)
        elif mode == "status":
            code, data, headers = arg
            self._reply(code, data, headers, method)
        elif mode in ("listing", "endless"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            chunks = _lazy_listing(arg) if mode == "listing" else iter(lambda: b"x" * 65536, None)
            for chunk in chunks:
                if not self._send(chunk):
                    break
        elif mode == "pages":
            with self.stub._lock:
                page = self.stub.pages_served
                self.stub.pages_served += 1
            entries = [{"type": "file", "oid": "0" * 40, "size": 1, "path": f"p{page}/f{i}.bin"} for i in range(arg)]
            nxt = f"{self.stub.url}{urlsplit(self.path).path}?cursor={time.monotonic_ns()}"
            self._json(200, entries, method, {"Link": f'<{nxt}>; rel="next"'})
        else:
            raise ValueError(f"unknown hostile mode {mode!r}")
        return True

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client hung up: what a bounded client does
            return False

    # --- routes --------------------------------------------------------------------------------

    def _api(self, repo_id: str, rest: list[str], method: str, token: str | None) -> None:
        repo = self._repo(repo_id, method, token)
        if repo is None:
            return None
        if rest == ["auth-check"]:
            if self._gate(repo, token, method):
                self._json(200, {}, method)
            return None
        if not rest or rest[0] == "revision":
            if rest and not self._revision_ok(repo, rest[1], method):
                return None
            info = {
                "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": repo.commit, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [f"license:{repo.card['license']}"] if repo.card and "license" in repo.card else [],
                "cardData": repo.card, "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                "lastModified": "2025-04-05T00:00:00.000Z", "createdAt": "2025-04-05T00:00:00.000Z",
            }
            return self._json(200, info, method)
        if rest[0] == "tree" and len(rest) >= 2:
            if not self._revision_ok(repo, rest[1], method):
                return None
            prefix = "/".join(rest[2:])
            entries = [e for e in repo.tree() if not prefix or e["path"].startswith(prefix + "/")]
            return self._json(200, entries, method)
        return self._error(404, None, "Not found", method)

    def _resolve(self, repo_id: str, rev: str, file: str, method: str, token: str | None) -> None:
        repo = self._repo(repo_id, method, token)
        if repo is None or not self._revision_ok(repo, rev, method) or not self._gate(repo, token, method):
            return None
        data = repo.files.get(file)
        if data is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist", method, repo.commit)
        blob = git_blob_sha1(data)
        if repo.is_lfs(file):
            sha = hashlib.sha256(data).hexdigest()
            return self._reply(302, b"", {
                "Location": f"{self.stub.cdn_url}/lfs-cdn/{sha}", "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{blob}"',
            }, method)
        self._content(file, data, method, {"X-Repo-Commit": repo.commit, "ETag": f'"{blob}"'})

    def _cdn_object(self, sha: str, method: str) -> None:
        for repo in self.stub.repos.values():
            for path, data in repo.files.items():
                if hashlib.sha256(data).hexdigest() == sha:
                    return self._content(path, data, method, {"ETag": f'"{sha}"'})
        return self._error(404, None, "Not found", method)

    def _content(self, path: str, data: bytes, method: str, headers: dict[str, str]) -> None:
        """The file body with Range support and the injected failures."""
        stub = self.stub
        cut = None
        if method == "GET":
            with stub._lock:
                cut = stub.cut_after.pop(path, None)
            if cut is None and stub._take(stub.fail, path):  # failures start after a pending cut
                return self._error(503, None, "Service unavailable", method)
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].endswith("-") and rng[6:-1].isdigit():
            start = int(rng[6:-1])
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, method)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        if method == "GET" and stub._take(stub.corrupt, path):
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes"}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "HEAD":
            return None
        if cut is not None:
            self.wfile.write(body[: max(cut - start, 0)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        self.wfile.write(body)


def _route_name(role: str, parts: list[str]) -> str | None:
    if role == "cdn":
        return "cdn"
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        rest = parts[4:]
        if not rest or rest[0] == "revision":
            return "info"
        return {"tree": "tree", "auth-check": "auth"}.get(rest[0])
    if len(parts) >= 5 and parts[2] == "resolve":
        return "resolve"
    return None


def _lazy_listing(n: int) -> Iterator[bytes]:
    """A JSON list of `n` file entries, produced as it is sent (a 300k-entry listing is ~30 MB); by bytes
    formatting of json.dumps' own rendering of one entry, so the stub outruns the client's per-answer timeout
    even on a slow, loaded machine (json.dumps per entry took over a second for the first 16 MiB there)."""
    entry = json.dumps({"type": "file", "oid": "0" * 40, "size": 1, "path": "d/f%07d.bin"}).encode()
    yield b"["
    for start in range(0, n, 1000):
        part = b",".join(entry % i for i in range(start, min(start + 1000, n)))
        yield (b"," if start else b"") + part
    yield b"]"


# --- olah ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_git_repo(root: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """A git repository under root/models/<org>/<name> with LFS pointers and .git/lfs/objects as
    git-lfs lays them out (no git-lfs binary needed). Returns the commit id.

    olah cannot serve non-LFS files of 121-149 bytes (it reads them as LFS pointers and crashes),
    so such files are refused here.
    """
    repo = root / "models" / repo_id
    repo.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_AUTHOR_DATE": "2025-04-05T00:00:00Z", "GIT_COMMITTER_DATE": "2025-04-05T00:00:00Z"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()

    git("init", "-q", "-b", "main")
    for path, data in files.items():
        dest = repo / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if len(data) >= LFS_MIN_SIZE:
            sha = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / sha[:2] / sha[2:4] / sha
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            dest.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n")
        else:
            if 120 < len(data) < 150:
                raise ValueError(f"{path}: olah cannot serve non-LFS files of 121-149 bytes")
            dest.write_bytes(data)
    git("add", "-A")
    git("commit", "-q", "-m", "init")
    return git("rev-parse", "HEAD")


@contextmanager
def olah_server(mirrors: Path, workdir: Path, *, timeout: float = 20.0) -> Iterator[str]:
    """Run olah (offline, local mirrors only) on 127.0.0.1; yields its URL, stops it at exit."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "[accessibility]\noffline = true\n"
    )
    log = open(workdir / "olah.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-c", "from olah.server import main; main()", "-c", str(config),
         "--log-path", str(workdir / "logs")],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"olah exited with {proc.returncode}: {(workdir / 'olah.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("olah did not start in time") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def isolate_hub_env(monkeypatch: Any, tmp_path: Path) -> None:
    """A clean huggingface_hub environment for one test: no stored token, online, no telemetry, no proxies,
    huggingface_hub's import-time paths pointed at the test's own directory."""
    import huggingface_hub.constants as hf_constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE", "CORRAL_ACCEPT_LLAMA_LICENSE",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "CORRAL_HUB_MAX_FILES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "corral-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
