"""Gated, selective, resumable and verified downloads from the Hugging Face Hub.

`download()` is what `corral download` runs. Before a single weight byte moves it resolves the
revision to a commit, lists the files with their sizes and LFS sha256, checks access (every
failure becomes one line with the fix, exit 4), applies the Llama license gate (exit 5) and
checks free disk space. Then it fetches only what is missing or corrupt, in parallel, through
huggingface_hub's own HTTP layer (`get_hf_file_metadata`, `http_get`: endpoint handling,
redirects, auth headers, Range retries), into partial files under `<out>/.cache/corral/` that
survive an interrupted run and are resumed with HTTP Range by the next one. Each file is
hashed (streamed) and compared with the Hub's LFS sha256 (git blob id for small files) before
it is moved into place; a mismatch is fetched once more, then refused (exit 3). Finally
`corral-manifest.json` records repository, commit, endpoint, files, sha256 and the license
acceptance.

Why not `snapshot_download`: huggingface_hub 2.x deletes a partial file when a transfer fails
(process-unique temp files), so a 50 GB shard interrupted at 49 GB starts over; and it neither
verifies sha256 nor reports progress through corral's `Progress`. Xet-backed files are fetched
over HTTP as well (the Hub's resolve redirect serves them with Range); hf_xet is not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from toolbox.errors import BadInputError, CorralError, CorruptFileError, UsageError
from toolbox.hub.errors import HubContext, hub_error
from toolbox.hub.gate import LicenseInfo, LicenseNotAcceptedError, gate, license_info
from toolbox.hub.manifest import (
    MANIFEST_NAME,
    DownloadManifest,
    LicenseAcceptance,
    ManifestFile,
    ManifestLicense,
    manifest_path,
    read_manifest,
)
from toolbox.progress import NULL_PROGRESS, Progress, Task

__all__ = [
    "MANIFEST_NAME",
    "DownloadManifest",
    "DownloadResult",
    "FileEntry",
    "InsufficientSpaceError",
    "LicenseNotAcceptedError",
    "download",
    "read_manifest",
    "resolve_endpoint",
]

ORIGINAL_PATTERN = "original/*"
STATE_DIR = ".cache/corral"
_CHUNK = 8 * 1024 * 1024
_DEFAULT_ENDPOINT = "https://huggingface.co"


class InsufficientSpaceError(BadInputError):
    """The selected files do not fit on the output's filesystem (exit 3); nothing was fetched."""


class _Cancelled(Exception):
    """Raised inside a worker's transfer loop when another file failed or the user interrupted."""


@dataclass
class FileEntry:
    """One selected file and what the download did (or, in a dry run, would do) with it.

    action: fetched | present (already there and verified) | fetch | resume | verify (dry run: present,
    will be hashed before it is trusted).
    """

    path: str
    size: int
    lfs: bool
    action: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "lfs": self.lfs, "action": self.action, "sha256": self.sha256}


@dataclass
class DownloadResult:
    """What `download()` did: the resolved commit, the files and bytes, the license state, the manifest."""

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    out_dir: Path
    dry_run: bool
    files: list[FileEntry]
    bytes_total: int
    bytes_to_fetch: int
    bytes_fetched: int
    free_bytes: int | None
    license: LicenseInfo
    acceptance: LicenseAcceptance | None
    license_newly_accepted: bool
    manifest: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def license_required(self) -> bool:
        """A dry run of a Llama repository that has no acceptance yet: the real run will ask for it."""
        return self.license.policy_id is not None and self.acceptance is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "out_dir": str(self.out_dir),
            "dry_run": self.dry_run,
            "bytes_total": self.bytes_total,
            "bytes_to_fetch": self.bytes_to_fetch,
            "bytes_fetched": self.bytes_fetched,
            "free_bytes": self.free_bytes,
            "license": {
                "hub_license": self.license.hub_license,
                "hub_license_name": self.license.hub_license_name,
                "policy": self.license.policy_id,
                "name": self.license.display_name,
                "required": self.license_required,
                "newly_accepted": self.license_newly_accepted,
                "acceptance": self.acceptance.model_dump(mode="json") if self.acceptance else None,
            },
            "manifest": str(self.manifest) if self.manifest else None,
            "files": [f.to_dict() for f in self.files],
            "notes": self.notes,
        }


@dataclass
class _Remote:
    """A file as the Hub lists it at the resolved commit."""

    path: str
    size: int
    lfs_sha256: str | None
    blob_id: str | None

    @property
    def lfs(self) -> bool:
        return self.lfs_sha256 is not None


@dataclass
class _Item:
    remote: _Remote
    dest: Path
    partial: Path
    action: str  # present | verify | fetch | resume
    sha256: str | None = None

    @property
    def remaining(self) -> int:
        done = self.partial.stat().st_size if self.action == "resume" else 0
        return max(self.remote.size - done, 0)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint: the argument, else $HF_ENDPOINT read now (not at import), else huggingface_hub's."""
    if endpoint:
        return endpoint.rstrip("/")
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return _DEFAULT_ENDPOINT


def public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part, fit for messages and the manifest."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else endpoint


def download(
    repo_id: str,
    out_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dry_run: bool = False,
    max_workers: int = 8,
    token: str | None = None,
    accept_license: bool = False,
    include_original: bool = False,
    endpoint: str | None = None,
    progress: Progress = NULL_PROGRESS,
) -> DownloadResult:
    """Download (or, with `dry_run`, plan) a Hub model repository into `out_dir`.

    `out_dir` defaults to the repository name in the current directory. `include`/`exclude` are
    huggingface_hub glob patterns (`*` crosses `/`). `original/` (Meta's second, native-format copy
    of the weights) is skipped unless `include_original` or an include pattern starts with
    "original". `token` defaults to HF_TOKEN or the `hf auth login` token; it is sent only to the
    Hub and never printed or written. Raises AccessError (4), LicenseNotAcceptedError (5),
    InsufficientSpaceError / CorruptFileError (3), UsageError (2).
    """
    from huggingface_hub import get_token

    if max_workers < 1:
        raise UsageError(f"--max-workers must be at least 1 (got {max_workers})")
    endpoint = resolve_endpoint(endpoint)
    shown_endpoint = public_endpoint(endpoint)
    revision = revision or "main"
    token = token or get_token() or None
    ctx = HubContext(repo_id=repo_id, endpoint=shown_endpoint, revision=revision, has_token=bool(token), token=token)
    out = Path(out_dir) if out_dir is not None else Path(repo_id.rstrip("/").split("/")[-1] or "download")

    with _mapped(ctx):
        commit, card, remote = _list_repo(repo_id, revision, endpoint, token)
    selected = _select(remote, include, exclude, include_original)
    _check_manifest_owner(out, repo_id)
    lic = license_info(repo_id, card)

    planned = _plan(out, commit, selected, hash_unknown=False)
    if dry_run:
        acceptance, new = gate(repo_id, lic, accept_license=accept_license, cache=_cache(), dry_run=True)
        return DownloadResult(
            repo_id=repo_id, revision=revision, commit=commit, endpoint=shown_endpoint, out_dir=out, dry_run=True,
            files=[FileEntry(i.remote.path, i.remote.size, i.remote.lfs, i.action, i.sha256) for i in planned],
            bytes_total=sum(r.size for r in selected), bytes_to_fetch=_bytes_to_fetch(planned), bytes_fetched=0,
            free_bytes=_disk_free(out), license=lic, acceptance=acceptance, license_newly_accepted=new)

    acceptance, new = gate(repo_id, lic, accept_license=accept_license, cache=_cache())
    _check_space(out, repo_id, _bytes_to_fetch(planned))  # before anything is created
    with _lock(out):
        items = _plan(out, commit, selected, hash_unknown=True, progress=progress)
        pending = [i for i in items if i.action in ("fetch", "resume")]
        need = _bytes_to_fetch(items)
        free = _check_space(out, repo_id, need)  # again: corrupt files found while hashing add to it
        fetched = _fetch_all(ctx, repo_id, commit, endpoint, token, pending, max_workers, progress, out)
        written = _write_manifest(out, repo_id, revision, commit, shown_endpoint, lic, acceptance, items)
        shutil.rmtree(out / STATE_DIR / "partial", ignore_errors=True)
    return DownloadResult(
        repo_id=repo_id, revision=revision, commit=commit, endpoint=shown_endpoint, out_dir=out, dry_run=False,
        files=[FileEntry(i.remote.path, i.remote.size, i.remote.lfs,
                         "fetched" if i.action in ("fetch", "resume") else "present", i.sha256) for i in items],
        bytes_total=sum(r.size for r in selected), bytes_to_fetch=need, bytes_fetched=fetched, free_bytes=free,
        license=lic, acceptance=acceptance, license_newly_accepted=new, manifest=written)


def _bytes_to_fetch(items: list[_Item]) -> int:
    return sum(i.remaining for i in items if i.action in ("fetch", "resume"))


def _check_space(out: Path, repo_id: str, need: int) -> int:
    """Refuse (exit 3, both numbers) when the bytes still to fetch exceed the free space; returns the free bytes."""
    free = _disk_free(out)
    if need > free:
        raise InsufficientSpaceError(
            f"not enough free space for {repo_id} in {out}: the download needs {human_size(need)} "
            f"({need:,} bytes) more, the filesystem has {human_size(free)} ({free:,} bytes) free",
            path=out, hint="free some space, choose another --output, or narrow the selection with "
            "--include/--exclude (see --dry-run)")
    return free


# --- listing and selection ---------------------------------------------------------------------


@contextmanager
def _mapped(ctx: HubContext, filename: str | None = None) -> Iterator[None]:
    """Turn Hub and network exceptions into CorralErrors (one line + the fix)."""
    try:
        yield
    except CorralError:
        raise
    except Exception as exc:
        mapped = hub_error(exc, ctx, filename=filename)
        if mapped is None:
            raise
        raise mapped from None


def _list_repo(repo_id: str, revision: str, endpoint: str, token: str | None
               ) -> tuple[str, dict[str, Any], list[_Remote]]:
    """Resolve the revision to a commit, read the card metadata, list the files and check access."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile

    from toolbox import __version__

    api = HfApi(endpoint=endpoint, token=token or False, library_name="corral", library_version=__version__)
    info = api.model_info(repo_id, revision=revision)
    commit = info.sha
    if not commit:
        raise BadInputError(f"{endpoint} did not resolve {repo_id}@{revision} to a commit",
                            hint="HF_ENDPOINT must point to a Hugging Face Hub compatible server")
    card = dict(info.card_data.to_dict()) if info.card_data is not None else {}
    if info.gated or info.private:
        try:
            api.auth_check(repo_id)
        except HfHubHTTPError as exc:
            response = getattr(exc, "response", None)
            # a mirror without the auth-check route: the per-file requests will still enforce access
            if not (response is not None and response.status_code == 404
                    and not response.headers.get("X-Error-Code")):
                raise
    remote = [
        _Remote(f.path, int(f.lfs.size if f.lfs is not None else f.size),
                f.lfs.sha256.lower() if f.lfs is not None else None, f.blob_id)
        for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(f, RepoFile)
    ]
    return commit, card, sorted(remote, key=lambda r: r.path)


def _select(remote: list[_Remote], include: Sequence[str] | None, exclude: Sequence[str] | None,
            include_original: bool) -> list[_Remote]:
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
    return chosen


def _check_manifest_owner(out: Path, repo_id: str) -> None:
    """Refuse to mix two repositories in one directory (their files and manifests would collide)."""
    if not manifest_path(out).is_file():
        return
    try:
        owner = read_manifest(out).repo_id
    except CorralError:
        return  # unreadable manifest: it will be rewritten
    if owner != repo_id:
        raise UsageError(f"{out} holds a download of {owner}, not {repo_id}",
                         hint="choose another --output directory")


# --- local state: what is present, verified, partial -------------------------------------------


class _State:
    """`<out>/.cache/corral/verified.json`: files corral has hashed, keyed by size and mtime.

    Lets a re-run trust a file it verified before without reading it again; any change to the
    file (size or mtime) sends it back through hashing.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_DIR / "verified.json"
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.files: dict[str, dict[str, Any]] = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            self.files = {}

    def trusted(self, remote: _Remote, dest: Path) -> str | None:
        """The sha256 recorded for an unchanged, verified file; None when it must be hashed."""
        rec = self.files.get(remote.path)
        try:
            st = dest.stat()
        except OSError:
            return None
        if not rec or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
            return None
        ok = rec.get("sha256") == remote.lfs_sha256 if remote.lfs else rec.get("git_sha1") == remote.blob_id
        return rec.get("sha256") if ok else None

    def record(self, path: str, dest: Path, sha256: str, git_sha1: str | None) -> None:
        from toolbox.tensors.atomic import atomic_file

        st = dest.stat()
        with self._lock:
            self.files[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                "git_sha1": git_sha1}
            with atomic_file(self.path, force=True) as tmp:
                tmp.write_text(json.dumps({"files": self.files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _partial_path(out: Path, remote: _Remote) -> Path:
    """Where a file's bytes accumulate until verified; the name binds it to this exact content."""
    key = hashlib.sha256(f"{remote.path}\0{remote.lfs_sha256 or remote.blob_id}".encode()).hexdigest()[:16]
    return out / STATE_DIR / "partial" / f"{Path(remote.path).name[:80]}.{key}.part"


def _plan(out: Path, commit: str, selected: list[_Remote], *, hash_unknown: bool,
          progress: Progress = NULL_PROGRESS) -> list[_Item]:
    """Decide per file: present (verified), fetch, resume, or (dry run) verify.

    With `hash_unknown`, present files corral has not verified yet are hashed now; a mismatch
    deletes them (they are corrupt or from another commit) and schedules a fetch.
    """
    from toolbox.tensors.atomic import safe_join

    state = _State(out)
    items: list[_Item] = []
    for r in selected:
        dest = safe_join(out, r.path)
        partial = _partial_path(out, r)
        item = _Item(r, dest, partial, "fetch")
        if dest.is_file() and dest.stat().st_size == r.size:
            sha = state.trusted(r, dest)
            item.action, item.sha256 = ("present", sha) if sha else ("verify", None)
        if item.action == "fetch" and partial.is_file() and 0 < partial.stat().st_size <= r.size:
            item.action = "resume"
        items.append(item)
    if not hash_unknown:
        return items
    unknown = [i for i in items if i.action == "verify"]
    if unknown:
        with progress.task("Checking existing files (bytes)", total=sum(i.remote.size for i in unknown)) as task:
            for item in unknown:
                sha, git_sha1 = _hash_file(item.dest, with_git_sha1=not item.remote.lfs, task=task)
                if _matches(item.remote, sha, git_sha1):
                    item.action, item.sha256 = "present", sha
                    state.record(item.remote.path, item.dest, sha, git_sha1)
                else:
                    item.dest.unlink()
                    item.action = "resume" if item.partial.is_file() else "fetch"
    for item in items:
        if item.action in ("fetch", "resume") and item.dest.exists() and not item.dest.is_file():
            raise UsageError(f"{item.dest} is in the way of {item.remote.path}", path=item.dest,
                             hint="move it out of the output directory")
    return items


def _hash_file(path: Path, *, with_git_sha1: bool, task: Task | None = None,
               cancel: threading.Event | None = None) -> tuple[str, str | None]:
    """sha256 (and the git blob sha1 for small non-LFS files) in one streamed pass, bounded memory."""
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if with_git_sha1 else None
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
            if task is not None:
                task.advance(len(chunk))
    return sha.hexdigest(), git.hexdigest() if git is not None else None


def _matches(remote: _Remote, sha256: str, git_sha1: str | None) -> bool:
    if remote.lfs:
        return sha256 == remote.lfs_sha256
    if remote.blob_id and git_sha1:
        return git_sha1 == remote.blob_id
    return True  # the Hub gave no hash for this file: size is all there is to check


def _disk_free(path: Path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing ancestor)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One corral download per directory at a time: two writers would interleave partial files."""
    from filelock import FileLock, Timeout

    lock_path = out / STATE_DIR / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"another corral download is writing into {out}",
                         hint="wait for it to finish, or choose another --output") from None
    try:
        yield
    finally:
        lock.release()


def _cache() -> Path:
    from toolbox.demo import cache_dir

    return cache_dir()


# --- fetching -----------------------------------------------------------------------------------


def _fetch_all(ctx: HubContext, repo_id: str, commit: str, endpoint: str, token: str | None,
               pending: list[_Item], max_workers: int, progress: Progress, out: Path) -> int:
    """Fetch and verify the pending files in parallel; the first failure cancels the others."""
    if not pending:
        return 0
    state = _State(out)
    cancel = threading.Event()
    fetched = [0]
    count_lock = threading.Lock()
    total = sum(i.remaining for i in pending)
    with progress.task(f"Downloading {repo_id} (bytes)", total=total) as task:
        bar = _bar_class(task, cancel)

        def one(item: _Item) -> None:
            with _mapped(ctx, item.remote.path):
                n = _fetch_one(item, repo_id, commit, endpoint, token, bar, task, cancel, state)
            with count_lock:
                fetched[0] += n

        with ThreadPoolExecutor(max_workers=min(max_workers, len(pending)), thread_name_prefix="corral-dl") as pool:
            futures = [pool.submit(one, item) for item in pending]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for fut in futures:
                    if fut in done and fut.exception() is not None and not isinstance(fut.exception(), _Cancelled):
                        raise fut.exception()  # type: ignore[misc]
            except BaseException:
                cancel.set()
                for fut in futures:
                    fut.cancel()
                raise
    return fetched[0]


def _fetch_one(item: _Item, repo_id: str, commit: str, endpoint: str, token: str | None, bar: type,
               task: Task, cancel: threading.Event, state: _State) -> int:
    """Download into the partial file (resuming), verify, move into place; one re-fetch on mismatch."""
    r = item.remote
    moved = 0
    for attempt in (1, 2):
        start = item.partial.stat().st_size if item.partial.is_file() else 0
        _transfer(item, repo_id, commit, endpoint, token, bar)
        moved += r.size - start
        sha, git_sha1 = _hash_file(item.partial, with_git_sha1=not r.lfs, cancel=cancel)
        if _matches(r, sha, git_sha1):
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item.partial, item.dest)
            item.sha256 = sha
            state.record(r.path, item.dest, sha, git_sha1)
            return moved
        item.partial.unlink(missing_ok=True)
        task.advance(-(r.size - start))  # the re-fetch counts again
        if attempt == 2:
            expected = r.lfs_sha256 if r.lfs else f"git blob {r.blob_id}"
            got = sha if r.lfs else f"git blob {git_sha1}"
            raise CorruptFileError(
                f"{r.path} from {repo_id}@{commit[:12]} does not match the Hub's hash after two downloads "
                f"(expected {expected}, got {got}); the file was deleted",
                hint="a proxy or mirror is altering the data; retry later or from another network")
    raise AssertionError("unreachable")  # pragma: no cover


def _transfer(item: _Item, repo_id: str, commit: str, endpoint: str, token: str | None, bar: type) -> None:
    """One file through huggingface_hub's HTTP layer, appending to the partial file (HTTP Range)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    from toolbox import __version__

    r = item.remote
    url = hf_hub_url(repo_id, r.path, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token or False, endpoint=endpoint, library_name="corral",
                                library_version=__version__, retry_on_errors=True)
    size = meta.size if meta.size is not None else r.size
    location = meta.location or url
    headers = build_hf_headers(token=token or False, library_name="corral", library_version=__version__)
    if urlsplit(location).netloc != urlsplit(url).netloc:  # a CDN: the token stays with the Hub
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    item.partial.parent.mkdir(parents=True, exist_ok=True)
    if item.partial.is_file() and item.partial.stat().st_size > size:
        item.partial.unlink()
    with open(item.partial, "ab") as f:
        http_get(location, f, resume_size=f.tell(), headers=headers, expected_size=size,
                 displayed_filename=r.path, tqdm_class=bar)


def _bar_class(task: Task, cancel: threading.Event) -> type:
    """A tqdm-shaped class huggingface_hub can drive: forwards bytes to corral's Progress task and
    stops the transfer (between chunks) once `cancel` is set."""

    class _Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.total = kwargs.get("total")
            self.n = 0

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            if cancel.is_set():
                raise _Cancelled
            self.n += int(n or 0)
            task.advance(n or 0)

        def __getattr__(self, name: str) -> Any:  # close, refresh, set_postfix_str, update_transfer, ...
            return lambda *a, **k: None

    return _Bar


# --- manifest -----------------------------------------------------------------------------------


def _write_manifest(out: Path, repo_id: str, revision: str, commit: str, endpoint: str, lic: LicenseInfo,
                    acceptance: LicenseAcceptance | None, items: list[_Item]) -> Path:
    """Write corral-manifest.json atomically; keeps entries of earlier selections of the same commit."""
    from toolbox import __version__
    from toolbox.tensors.atomic import atomic_file

    files = {i.remote.path: ManifestFile(path=i.remote.path, size=i.remote.size, sha256=i.sha256 or "",
                                         lfs=i.remote.lfs) for i in items}
    target = manifest_path(out)
    try:
        old = read_manifest(out) if target.is_file() else None
    except CorralError:
        old = None
    if old is not None and old.repo_id == repo_id and old.commit == commit:
        for f in old.files:
            on_disk = out / f.path
            if f.path not in files and on_disk.is_file() and on_disk.stat().st_size == f.size:
                files[f.path] = f
        if acceptance is None and old.license.acceptance is not None:
            acceptance = old.license.acceptance
    manifest = DownloadManifest(
        repo_id=repo_id, revision=revision, commit=commit, endpoint=endpoint, corral_version=__version__,
        license=ManifestLicense(hub_license=lic.hub_license, hub_license_name=lic.hub_license_name,
                                policy=lic.policy_id, acceptance=acceptance),
        files=tuple(files[p] for p in sorted(files)),
    )
    with atomic_file(target, force=True) as tmp:
        tmp.write_text(manifest.to_json(), encoding="utf-8")
    return target


def human_size(n: float) -> str:
    """Decimal units, as the Hub shows sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
