"""Gated, selective, resumable and verified downloads from the Hugging Face Hub.

`download()` is what `corral download` runs. Before a single weight byte moves it resolves the
revision to a commit, lists the files with their sizes and LFS sha256, checks access (every
failure becomes one line with the fix, exit 4), applies the Llama license gate (exit 5) and
checks free disk space. Then it fetches only what is missing or corrupt, in parallel, into
partial files under `<out>/.cache/corral/` that survive an interrupted run and are resumed with
HTTP Range by the next one. Each file is hashed (streamed) and compared with the Hub's LFS
sha256 (git blob id for small files) before it is moved into place; a mismatch is fetched once
more, then refused (exit 3). Finally `corral-manifest.json` records repository, commit,
endpoint, files, sha256 and the license acceptance.

The endpoint is a stranger's server when HF_ENDPOINT names a mirror, so every request is
bounded (limits.py: timeouts, deadline, redirects, listing size), every answer validated
(listing.py), and no file gets more bytes than its listed size (transfer.py). Requests go
through http.py, not huggingface_hub's session, which has no timeout; huggingface_hub still
provides the headers, the error classes and the glob selection.

Why not `snapshot_download`: huggingface_hub 2.x deletes a partial file when a transfer fails
(process-unique temp files), so a 50 GB shard interrupted at 49 GB starts over; and it neither
verifies sha256 nor reports progress through corral's `Progress`. Xet-backed files are fetched
over HTTP as well (the Hub's resolve redirect serves them with Range); hf_xet is not used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError, DiskFullError, UsageError
from toolbox.hub.errors import HubContext, mapped, public_url, scrubbed
from toolbox.hub.gate import LicenseInfo, LicenseNotAcceptedError, gate, license_info
from toolbox.hub.http import HubHttp
from toolbox.hub.limits import Deadline, HubLimits
from toolbox.hub.listing import STATE_DIR, api_url, list_repo, select
from toolbox.hub.manifest import (
    MANIFEST_NAME,
    DownloadManifest,
    LicenseAcceptance,
    ManifestFile,
    ManifestLicense,
    manifest_path,
    read_manifest,
)
from toolbox.hub.state import Item, bytes_to_fetch, plan
from toolbox.hub.transfer import fetch_all
from toolbox.progress import NULL_PROGRESS, Progress

__all__ = [
    "MANIFEST_NAME",
    "DownloadManifest",
    "DownloadResult",
    "FileEntry",
    "HubLimits",
    "InsufficientSpaceError",
    "LicenseNotAcceptedError",
    "download",
    "human_size",
    "read_manifest",
    "resolve_endpoint",
]

_DEFAULT_ENDPOINT = "https://huggingface.co"


class InsufficientSpaceError(DiskFullError):
    """The selected files do not fit on the output's filesystem (exit 3); nothing was fetched."""


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
    return public_url(endpoint)


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
    limits: HubLimits | None = None,
) -> DownloadResult:
    """Download (or, with `dry_run`, plan) a Hub model repository into `out_dir`.

    `out_dir` defaults to the repository name in the current directory. `include`/`exclude` are
    huggingface_hub glob patterns (`*` crosses `/`). `original/` (Meta's second, native-format copy
    of the weights) is skipped unless `include_original` or an include pattern starts with
    "original". `token` defaults to HF_TOKEN or the `hf auth login` token; it is sent only to the
    Hub and never printed or written. `limits` bounds time, redirects and listing size (default:
    `HubLimits.from_env()`, CORRAL_HUB_TIMEOUT / CORRAL_HUB_DEADLINE / CORRAL_HUB_MAX_FILES).
    Raises AccessError (4; HubAnswerError / HubTimeoutError for a misbehaving endpoint),
    LicenseNotAcceptedError (5), InsufficientSpaceError (4, like every disk-full refusal), CorruptFileError (3),
    UsageError (2).
    """
    from huggingface_hub import get_token

    if max_workers < 1:
        raise UsageError(f"--max-workers must be at least 1 (got {max_workers})")
    limits = limits or HubLimits.from_env()
    endpoint = resolve_endpoint(endpoint)
    shown_endpoint = public_endpoint(endpoint)
    revision = revision or "main"
    token = token or get_token() or None
    ctx = HubContext(repo_id=repo_id, endpoint=shown_endpoint, revision=revision, has_token=bool(token), token=token)
    out = Path(out_dir) if out_dir is not None else Path(repo_id.rstrip("/").split("/")[-1] or "download")

    with scrubbed(ctx), HubHttp(endpoint, token, limits, Deadline(limits.deadline)) as http:
        with mapped(ctx):
            commit, card, remote = list_repo(http, repo_id, revision, limits.max_files)
        selected = select(remote, include, exclude, include_original, api_url(endpoint, repo_id, "tree", commit))
        _check_manifest_owner(out, repo_id)
        lic = license_info(repo_id, card)
        base = {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": shown_endpoint,
                "out_dir": out, "bytes_total": sum(r.size for r in selected), "license": lic}
        planned = plan(out, commit, selected, hash_unknown=False)
        if dry_run:
            acceptance, new = gate(repo_id, lic, accept_license=accept_license, cache=_cache(), dry_run=True)
            return DownloadResult(
                **base, dry_run=True, bytes_to_fetch=bytes_to_fetch(planned), bytes_fetched=0,
                files=[FileEntry(i.remote.path, i.remote.size, i.remote.lfs, i.action, i.sha256) for i in planned],
                free_bytes=_disk_free(out), acceptance=acceptance, license_newly_accepted=new)

        acceptance, new = gate(repo_id, lic, accept_license=accept_license, cache=_cache())
        _check_space(out, repo_id, bytes_to_fetch(planned))  # before anything is created
        with _lock(out):
            items = plan(out, commit, selected, hash_unknown=True, progress=progress)
            pending = [i for i in items if i.action in ("fetch", "resume")]
            need = bytes_to_fetch(items)
            free = _check_space(out, repo_id, need)  # again: corrupt files found while hashing add to it
            fetched = fetch_all(http, ctx, repo_id, commit, pending, max_workers, progress, out)
            written = _write_manifest(out, repo_id, revision, commit, shown_endpoint, lic, acceptance, items)
            shutil.rmtree(out / STATE_DIR / "partial", ignore_errors=True)
    return DownloadResult(
        **base, dry_run=False, bytes_to_fetch=need, bytes_fetched=fetched, free_bytes=free,
        files=[FileEntry(i.remote.path, i.remote.size, i.remote.lfs,
                         "fetched" if i.action in ("fetch", "resume") else "present", i.sha256) for i in items],
        acceptance=acceptance, license_newly_accepted=new, manifest=written,
        notes=[f"{i.remote.path}: resumed {i.resumes} time(s) after a cut connection" for i in items if i.resumes])


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


# --- manifest -----------------------------------------------------------------------------------


def _write_manifest(out: Path, repo_id: str, revision: str, commit: str, endpoint: str, lic: LicenseInfo,
                    acceptance: LicenseAcceptance | None, items: list[Item]) -> Path:
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
