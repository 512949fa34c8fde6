"""A local Hub that accepts uploads: `HubStub` plus the write endpoints huggingface_hub calls.

The requests are the ones huggingface_hub (2.x) sends for `create_repo`, `create_branch` and
`create_commit` with the LFS protocol (hf_xet disabled): POST /api/repos/create, POST
/api/models/R/branch/B, POST /api/validate-yaml (a README.md in the commit), POST
/api/models/R/preupload/REV (upload mode per file from its size), POST R.git/info/lfs/objects/batch
(basic transfer: an upload href on the "CDN" server, which must not see the token, and a verify
href on the Hub), PUT of the object (its sha256 and size are checked), POST .../verify, and POST
/api/models/R/commit/REV (NDJSON: header, file with base64 content, lfsFile naming an uploaded
object). A commit replaces the files it names, so a download of the same repository from the same
server (the `HubStub` routes) gets what was committed. Objects already stored are answered without
an upload action, as huggingface.co does, which is what lets an interrupted upload resume.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hub_server import LFS_MIN_SIZE, HubStub, Seen, StubRepo, _Handler, _QuietServer, git_blob_sha1

MAX_BODY = 256 * 1024 * 1024  # the demo GGUF is ~63 MiB


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, str]  # path -> "lfs:<sha256>" or "regular:<git blob sha1>"
    oid: str
    create_pr: bool = False


@dataclass
class UploadState:
    objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content (PUT bodies)
    branches: dict[tuple[str, str], StubRepo] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)
    fail_commits: int = 0  # answer this many commit POSTs with 400 (an interrupted publish)


class HubUploadStub(HubStub):
    """`HubStub` that also takes repositories, branches, LFS objects and commits."""

    def __init__(self, repos: list[StubRepo] | None = None, *, tokens: set[str] | None = None) -> None:
        self.upload = UploadState()
        super().__init__(repos or [], tokens=tokens)

    def _server(self, role: str) -> Any:
        stub = self

        class Handler(_UploadHandler):
            pass

        Handler.stub, Handler.role = stub, role
        srv = _QuietServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    def writes(self) -> list[Seen]:
        """Every request that could write: what a refused publish must not send."""
        return [s for s in self.seen() if s.method in ("POST", "PUT")]

    def _take_commit_failure(self) -> bool:
        with self._lock:
            if self.upload.fail_commits > 0:
                self.upload.fail_commits -= 1
                return True
            return False


class _UploadHandler(_Handler):
    stub: HubUploadStub
    _branch_repo: StubRepo | None = None

    def do_POST(self) -> None:
        self._write("POST")

    def do_PUT(self) -> None:
        self._write("PUT")

    # a download of a branch (or of a branch's commit) reads that branch's files
    def _route(self, method: str) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        rev = None
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            rev = (parts[2] + "/" + parts[3], parts[5])
        elif len(parts) >= 5 and parts[2] == "resolve":
            rev = (parts[0] + "/" + parts[1], parts[3])
        if rev is not None:
            for (rid, branch), repo in self.stub.upload.branches.items():
                if rid == rev[0] and rev[1] in (branch, repo.commit):
                    self._branch_repo = repo
        super()._route(method)

    def _repo(self, repo_id: str, method: str, token: str | None) -> StubRepo | None:
        if self._branch_repo is not None and self._branch_repo.repo_id == repo_id:
            return self._branch_repo
        return super()._repo(repo_id, method, token)

    def _revision_ok(self, repo: StubRepo, rev: str, method: str) -> bool:
        if repo is self._branch_repo:
            return True
        return super()._revision_ok(repo, rev, method)

    def _cdn_object(self, sha: str, method: str) -> None:
        data = self.stub.upload.objects.get(sha)  # a branch's files are served from the object store
        if data is None:
            return super()._cdn_object(sha, method)
        return self._content(sha, data, method, {"ETag": f'"{sha}"'})

    # --- writes ------------------------------------------------------------------------------------

    def _write(self, method: str) -> None:
        stub = self.stub
        url = urlsplit(self.path)
        with stub._lock:
            stub.requests.append(Seen(self.role, method, url.path, None, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._error(413, None, "Payload too large", method)
        body = self.rfile.read(length) if length else b""
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if self.role == "cdn":
            if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
                return self._put_object(parts[1], body)
            return self._error(404, None, "Not found", method)
        token = self._token()
        if token is None or token not in stub.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header", method)
        query = parse_qs(url.query)
        if parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []}, method)
        if len(parts) == 6 and parts[-1] in ("batch", "verify") and parts[1].endswith(".git"):
            repo_id = parts[0] + "/" + parts[1].removesuffix(".git")
            return self._lfs(repo_id, parts[-1], json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rev = parts[2] + "/" + parts[3], parts[4], "/".join(parts[5:])
            if repo_id not in stub.repos:
                return self._error(404, "RepoNotFound", "Repository not found", method)
            if action == "branch":
                return self._branch(repo_id, rev)
            if action == "preupload":
                return self._preupload(repo_id, rev, json.loads(body))
            if action == "commit":
                return self._commit(repo_id, rev, body, "create_pr" in query)
        return self._error(404, None, "Not found", method)

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.stub.url}/{repo_id}"
        if repo_id in self.stub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url}, "POST")
        self.stub.repos[repo_id] = StubRepo(repo_id, {})
        if payload.get("visibility") == "private":
            self.stub.upload.private.add(repo_id)
        return self._json(200, {"url": url, "name": repo_id}, "POST")

    def _branch(self, repo_id: str, branch: str) -> None:
        key = (repo_id, branch)
        if branch == "main" or key in self.stub.upload.branches:
            return self._error(409, None, f"Reference refs/heads/{branch} already exists", "POST")
        self.stub.upload.branches[key] = StubRepo(repo_id, dict(self.stub.repos[repo_id].files))
        return self._json(200, {}, "POST")

    def _target(self, repo_id: str, rev: str) -> StubRepo | None:
        if rev == "main":
            return self.stub.repos[repo_id]
        return self.stub.upload.branches.get((repo_id, rev))

    def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any]) -> None:
        repo = self._target(repo_id, rev)
        if repo is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "POST")
        answer = []
        for f in payload["files"]:
            old = repo.files.get(f["path"])
            lfs = f["size"] >= LFS_MIN_SIZE
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        return self._json(200, {"files": answer, "commitOid": repo.commit}, "POST")

    def _lfs(self, repo_id: str, action: str, payload: dict[str, Any]) -> None:
        stored = self.stub.upload.objects
        if action == "verify":
            ok = stored.get(payload["oid"]) is not None and len(stored[payload["oid"]]) == payload["size"]
            return self._json(200 if ok else 404, {"message": "ok" if ok else "object not found"}, "POST")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in stored:  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.stub.cdn_url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.stub.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return self._reply(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                           {"Content-Type": "application/vnd.git-lfs+json"}, "POST")

    def _put_object(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, "sha256 of the body is not the object id", "PUT")
        with self.stub._lock:
            self.stub.upload.objects[oid] = body
        return self._reply(200, b"", {}, "PUT")

    def _commit(self, repo_id: str, rev: str, body: bytes, create_pr: bool) -> None:
        stub = self.stub
        if self.headers.get("Content-Type") != "application/x-ndjson":
            return self._error(400, None, "commit payload must be NDJSON", "POST")
        if stub._take_commit_failure():
            return self._error(400, None, "commit interrupted (test)", "POST")
        repo = self._target(repo_id, rev)
        if repo is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", "POST")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, ops = lines[0], lines[1:]
        if header.get("key") != "header":
            return self._error(400, None, "first NDJSON line must be the header", "POST")
        files: dict[str, bytes] = {}
        recorded: dict[str, str] = {}
        for op in ops:
            value = op["value"]
            if op["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                recorded[value["path"]] = "regular:" + git_blob_sha1(files[value["path"]])
            elif op["key"] == "lfsFile":
                data = stub.upload.objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return self._error(422, None, f"LFS object {value['oid']} was not uploaded", "POST")
                files[value["path"]] = data
                recorded[value["path"]] = "lfs:" + value["oid"]
            else:
                return self._error(400, None, f"unsupported operation {op['key']}", "POST")
        target = StubRepo(repo_id, {**repo.files, **files}) if create_pr else repo
        if not create_pr:
            repo.files.update(files)
            if "README.md" in files:  # the Hub reads the card's front matter into cardData
                repo.card = _front_matter(files["README.md"])
        commit = Commit(repo_id, rev, header["value"]["summary"], recorded, target.commit, create_pr)
        with stub._lock:
            stub.upload.commits.append(commit)
            if create_pr:  # the pull request's ref, readable by its commit like a branch
                stub.upload.branches[(repo_id, f"refs/pr/{len(stub.upload.commits)}")] = target
        answer = {"commitUrl": f"{stub.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                  "pullRequestUrl": f"{stub.url}/{repo_id}/discussions/1" if create_pr else None}
        return self._json(200, answer, "POST")



def _front_matter(card: bytes) -> dict[str, Any] | None:
    import yaml

    text = card.decode("utf-8")
    if not text.startswith("---\n"):
        return None
    data = yaml.safe_load(text[4:text.find("\n---", 4)])
    return data if isinstance(data, dict) else None
