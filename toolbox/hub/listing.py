"""What the Hub says a repository holds: commit, card metadata and file list, validated.

Every answer is checked against a typed model (pydantic, strict types) before corral uses it; a
wrong type, a missing field, a listing over its bounds, a path listed twice, a path escaping the
output (absolute, `..`, backslash, NUL, drive letter) or one reserved for corral's own files
(`corral-manifest.json`, `.cache/`) is refused with exit 4 naming the endpoint URL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from toolbox.errors import UsageError
from toolbox.hub.errors import HubAnswerError, shown
from toolbox.hub.http import HubHttp
from toolbox.hub.limits import MAX_FILES_ENV, MAX_NAME_BYTES, MAX_PATH_CHARS
from toolbox.hub.manifest import MANIFEST_NAME

ORIGINAL_PATTERN = "original/*"
STATE_DIR = ".cache/corral"
RESERVED_DIR = ".cache"  # corral's state lives in .cache/corral/, huggingface_hub's in .cache/huggingface/
_MAX_SIZE = 1 << 50  # 1 PiB: more is not a file size


@dataclass
class Remote:
    """A file as the Hub lists it at the resolved commit."""

    path: str
    size: int
    lfs_sha256: str | None
    blob_id: str | None

    @property
    def lfs(self) -> bool:
        return self.lfs_sha256 is not None


class _ModelInfo(BaseModel):
    """The fields of /api/models/{repo}/revision/{rev} corral uses (huggingface.co sends many more)."""

    model_config = ConfigDict(extra="ignore")

    sha: StrictStr = Field(pattern=r"^[0-9a-f]{40}$")
    private: StrictBool | None = None
    gated: StrictBool | StrictStr | None = None
    cardData: dict[str, Any] | None = None  # the Hub's field name


class _Lfs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    oid: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    size: StrictInt = Field(ge=0, le=_MAX_SIZE)


class _TreeEntry(BaseModel):
    """One entry of /api/models/{repo}/tree/{commit}?recursive=true."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["file", "directory"]
    path: StrictStr = Field(min_length=1, max_length=MAX_PATH_CHARS)
    size: StrictInt = Field(0, ge=0, le=_MAX_SIZE)
    oid: StrictStr | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    lfs: _Lfs | None = None


def _why(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the answer"
    return f"{where}: {first['msg']}"


def api_url(endpoint: str, repo_id: str, *parts: str) -> str:
    return "/".join([f"{endpoint}/api/models/{quote(repo_id, safe='/')}", *(quote(p, safe="") for p in parts)])


def list_repo(http: HubHttp, repo_id: str, revision: str, max_files: int
              ) -> tuple[str, dict[str, Any], list[Remote]]:
    """Resolve the revision to a commit, read the card metadata, check access, list the files."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    url = api_url(http.endpoint, repo_id, "revision", revision)
    data, _, _ = http.get_json(url)
    try:
        info = _ModelInfo.model_validate(data)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else "sha"
        what = "does not resolve {} to a commit" if field == "sha" else "of {} has an unusable field"
        raise HubAnswerError(url, f"the model info {what.format(f'{repo_id}@{shown(revision, 80)}')} "
                             f"({_why(exc)})") from None
    if info.gated or info.private:
        _auth_check(http, repo_id)
    return info.sha, dict(info.cardData or {}), _tree(http, repo_id, info.sha, max_files)


def _auth_check(http: HubHttp, repo_id: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        http.get_json(api_url(http.endpoint, repo_id, "auth-check"))
    except HubAnswerError:
        pass  # a 200 with an odd body still means access; the per-file requests enforce it anyway
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        # a mirror without the auth-check route: the per-file requests will still enforce access
        if not (response is not None and response.status_code == 404 and not response.headers.get("X-Error-Code")):
            raise


def _tree(http: HubHttp, repo_id: str, commit: str, max_files: int) -> list[Remote]:
    """The recursive listing, page by page (huggingface.co: Link rel=next), within its bounds."""
    url: str | None = api_url(http.endpoint, repo_id, "tree", commit)
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    first = url or ""
    files: dict[str, Remote] = {}
    dirs: set[str] = set()
    seen_pages: set[str] = set()
    total_bytes = 0
    while url is not None:
        if url in seen_pages:
            raise HubAnswerError(first, "the file listing's pages loop back to one already read")
        seen_pages.add(url)
        data, response, size = http.get_json(url, params=params)
        total_bytes += size
        if total_bytes > http.limits.max_listing_bytes:
            raise HubAnswerError(first, f"the file listing is longer than {http.limits.max_listing_bytes:,} bytes")
        if not isinstance(data, list):
            raise HubAnswerError(url, f"the file listing is a JSON {type(data).__name__}, not a list")
        if len(files) + len(dirs) + len(data) > max_files:
            raise HubAnswerError(first, f"the file listing has more than {max_files:,} entries",
                                 hint=f"raise {MAX_FILES_ENV} if this repository really holds that many files")
        for i, raw in enumerate(data):
            _add(url, i, raw, files, dirs)
        url, params = _next_page(http, url, response, bool(data)), None
    clash = sorted(dirs & set(files)) or sorted(d for p in files for d in _parents(p) if d in files)
    if clash:
        raise HubAnswerError(first, f"{shown(clash[0], 100)!s} is listed both as a file and as a directory")
    return sorted(files.values(), key=lambda r: r.path)


def _next_page(http: HubHttp, url: str, response: Any, had_entries: bool) -> str | None:
    """The Link rel="next" of a listing page (huggingface.co's cursor pagination), kept on the endpoint."""
    try:
        nxt = response.links.get("next", {}).get("url")
    except Exception:  # a malformed Link header, whatever httpx2's parser makes of it
        raise HubAnswerError(url, "an unreadable Link header on the file listing") from None
    if not nxt:
        return None
    if not had_entries:
        raise HubAnswerError(url, "an empty page of the file listing links to another")
    target = http.target(url, str(nxt))
    if not http.on_endpoint(target):
        raise HubAnswerError(url, f"the file listing continues on another server ({shown(target, 100)})")
    return target


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _add(url: str, i: int, raw: object, files: dict[str, Remote], dirs: set[str]) -> None:
    try:
        entry = _TreeEntry.model_validate(raw)
    except ValidationError as exc:
        raise HubAnswerError(url, f"entry {i} of the file listing: {_why(exc)}") from None
    problem = path_problem(entry.path)
    if problem:
        raise HubAnswerError(url, f"the listing names {shown(entry.path, 100)!r}, {problem}",
                             hint="corral refuses the whole listing; the mirror at HF_ENDPOINT is broken or hostile")
    if entry.type == "directory":
        dirs.add(entry.path)
        return
    if entry.path in files:
        raise HubAnswerError(url, f"{shown(entry.path, 100)} is listed twice",
                             hint="the mirror at HF_ENDPOINT is broken or hostile; corral refuses the listing")
    size = entry.lfs.size if entry.lfs is not None else entry.size
    files[entry.path] = Remote(entry.path, size, entry.lfs.oid if entry.lfs is not None else None, entry.oid)


_DRIVE = re.compile(r"^[A-Za-z]:")


def path_problem(path: str) -> str | None:
    """Why a listed path cannot be written under the output directory, or None."""
    if "\0" in path or any(not c.isprintable() for c in path):
        return "which holds a NUL or control character"
    if "\\" in path:
        return "which holds a backslash"
    if path.startswith("/") or _DRIVE.match(path):
        return "an absolute path"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "which escapes the output or has an empty component"
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        return f"which has a name longer than {MAX_NAME_BYTES} bytes"
    return None


def reserved(path: str) -> bool:
    """A path corral writes itself: the manifest, or anything under .cache/ (compared case-blind)."""
    low = path.lower()
    return low == MANIFEST_NAME or low.split("/")[0] == RESERVED_DIR


def select(remote: list[Remote], include: Sequence[str] | None, exclude: Sequence[str] | None,
           include_original: bool, url: str) -> list[Remote]:
    """The files the patterns select; a selected path reserved for corral's own files is refused."""
    from huggingface_hub.utils import filter_repo_objects

    include = list(include or []) or None
    ignore = list(exclude or [])
    if not include_original and not any(p.lstrip("./").startswith("original") for p in include or []):
        ignore.append(ORIGINAL_PATTERN)
    chosen = list(filter_repo_objects(remote, allow_patterns=include, ignore_patterns=ignore or None,
                                      key=lambda r: r.path))
    if not chosen:
        patterns = ", ".join([*(f"--include {p}" for p in include or []), *(f"--exclude {p}" for p in ignore)])
        raise UsageError(f"no file of the repository matches the selection ({patterns or 'empty repository'})",
                         hint="run with --dry-run and no patterns to see the file list")
    bad = next((r.path for r in chosen if reserved(r.path)), None)
    if bad is not None:
        raise HubAnswerError(url, f"the listing names {shown(bad, 100)!r}, a path corral reserves for its own "
                             "files (corral-manifest.json, .cache/)",
                             hint=f"skip it with --exclude '{shown(bad, 100)}' if the repository really holds it")
    return chosen
