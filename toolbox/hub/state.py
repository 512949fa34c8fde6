"""A download directory's own state: what is present and verified, what is partial, what to fetch.

`<out>/.cache/corral/verified.json` remembers files corral has hashed (by size and mtime), so a
re-run trusts them without reading them again; partial files live under
`<out>/.cache/corral/partial/`, named after the content they will hold, until verified.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import UsageError
from toolbox.hub.listing import STATE_DIR, Remote
from toolbox.progress import NULL_PROGRESS, Progress, Task

CHUNK = 8 * 1024 * 1024


class Cancelled(Exception):
    """Raised inside a worker's loop when another file failed or the user interrupted."""


@dataclass
class Item:
    """One selected file, where it goes, where its bytes accumulate, and what to do with it."""

    remote: Remote
    dest: Path
    partial: Path
    action: str  # present | verify | fetch | resume
    sha256: str | None = None
    resumes: int = 0  # connections cut mid-body and resumed in this run (reported in the result's notes)

    @property
    def remaining(self) -> int:
        done = self.partial.stat().st_size if self.action == "resume" else 0
        return max(self.remote.size - done, 0)


class State:
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

    def trusted(self, remote: Remote, dest: Path) -> str | None:
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


def partial_path(out: Path, remote: Remote) -> Path:
    """Where a file's bytes accumulate until verified; the name binds it to this exact content."""
    key = hashlib.sha256(f"{remote.path}\0{remote.lfs_sha256 or remote.blob_id}".encode()).hexdigest()[:16]
    return out / STATE_DIR / "partial" / f"{Path(remote.path).name[:80]}.{key}.part"


def plan(out: Path, commit: str, selected: list[Remote], *, hash_unknown: bool,
         progress: Progress = NULL_PROGRESS) -> list[Item]:
    """Decide per file: present (verified), fetch, resume, or (dry run) verify.

    With `hash_unknown`, present files corral has not verified yet are hashed now; a mismatch
    deletes them (they are corrupt or from another commit) and schedules a fetch.
    """
    from toolbox.tensors.atomic import safe_join

    state = State(out)
    items: list[Item] = []
    for r in selected:
        dest = safe_join(out, r.path)
        partial = partial_path(out, r)
        item = Item(r, dest, partial, "fetch")
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
        with progress.task("Checking existing files", total=sum(i.remote.size for i in unknown), unit="bytes") as task:
            for item in unknown:
                sha, git_sha1 = hash_file(item.dest, with_git_sha1=not item.remote.lfs, task=task)
                if matches(item.remote, sha, git_sha1):
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


def hash_file(path: Path, *, with_git_sha1: bool, task: Task | None = None,
              cancel: threading.Event | None = None) -> tuple[str, str | None]:
    """sha256 (and the git blob sha1 for small non-LFS files) in one streamed pass, bounded memory."""
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if with_git_sha1 else None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
            if task is not None:
                task.advance(len(chunk))
    return sha.hexdigest(), git.hexdigest() if git is not None else None


def matches(remote: Remote, sha256: str, git_sha1: str | None) -> bool:
    if remote.lfs:
        return sha256 == remote.lfs_sha256
    if remote.blob_id and git_sha1:
        return git_sha1 == remote.blob_id
    return True  # the Hub gave no hash for this file: size is all there is to check


def bytes_to_fetch(items: list[Item]) -> int:
    return sum(i.remaining for i in items if i.action in ("fetch", "resume"))
