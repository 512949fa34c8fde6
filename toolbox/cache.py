"""The corral cache, measured and trimmed: demos, recipe objects and sources, downloads' partials.

Layout (toolbox.demo.cache_dir(), default ~/.cache/corral): `demo/<variant>-v<N>/` and
`tokenizer/` (demos), `recipes/objects/<key>/` (built recipe steps, read-only, published by hard
link), `recipes/objects/.<key>.<id>.partial/` (a step being built), `recipes/hub/<repo>/` (recipe
sources from the Hub) with `.cache/corral/partial/*.part` inside (downloads' resumable partials).

`gc` never removes an object that a given lock file names, one that a publish directory still
hard-links, or any object while a recipe is building in the cache (a staging directory younger
than RUNNING_SECONDS): a running recipe may be about to reuse it. The age of an entry is the
later of its record's modification and access time (a use reads the record: corral-object.json of an
object, config.json of a demo).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError

KINDS = ("demos", "recipe objects", "recipe sources", "download partials", "staging")
RUNNING_SECONDS = 6 * 3600  # a staging directory younger than this belongs to a recipe still running
MAX_FILES = 2_000_000  # files looked at per scan
MAX_LOCK_BYTES = 16 << 20


@dataclass
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float
    protected: str | None = None  # why gc keeps it, whatever its age

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "bytes": self.bytes, "last_used": self.last_used,
                "protected": self.protected}


@dataclass
class GcResult:
    root: Path
    dry_run: bool
    removed: list[Entry] = field(default_factory=list)
    kept: list[Entry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "dry_run": self.dry_run,
                "removed": [e.to_dict() for e in self.removed], "freed_bytes": sum(e.bytes for e in self.removed),
                "kept_bytes": sum(e.bytes for e in self.kept),
                "protected": [e.to_dict() for e in self.kept if e.protected]}


class _Budget:
    def __init__(self) -> None:
        self.files = 0

    def tick(self, root: Path) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise BadInputError(f"{root}: more than {MAX_FILES:,} files in the cache: not scanned further",
                                path=root, hint="remove the directory by hand, or give --cache-dir elsewhere")


def _size(path: Path, budget: _Budget, skip: Path | None = None) -> int:
    """Apparent bytes under `path` (symlinks not followed), without `skip`."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        budget.tick(path)
        return st.st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in filenames:
            budget.tick(path)
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _used(path: Path) -> float:
    """When `path` was last used: a file's later of modification and access time; for a directory, its
    modification time or that of the record a use reads (corral-object.json, config.json). A directory's
    own access time is not used: scanning the cache (this module) would refresh it."""
    try:
        if not path.is_dir():
            st = path.stat()
            return max(st.st_mtime, st.st_atime)
        times = [path.stat().st_mtime]
        for record in ("corral-object.json", "config.json"):
            if (path / record).is_file():
                st = (path / record).stat()
                times += [st.st_mtime, st.st_atime]
        return max(times)
    except OSError:
        return 0.0


def _linked(path: Path, budget: _Budget) -> bool:
    """Whether a file of the object is hard-linked from elsewhere (a publish directory)."""
    for p in path.rglob("*"):
        budget.tick(path)
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and p.name != "corral-object.json":
            return True
    return False


def locked_keys(locks: list[Path]) -> set[str]:
    """The object keys that recipe lock files name (their `steps.*.key`)."""
    keys: set[str] = set()
    for lock in locks:
        try:
            with open(lock, "rb") as f:
                raw = f.read(MAX_LOCK_BYTES + 1)
            doc = json.loads(raw) if len(raw) <= MAX_LOCK_BYTES else None
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{lock}: not a readable recipe lock file ({exc})", path=lock) from None
        steps = doc.get("steps") if isinstance(doc, dict) else None
        if not isinstance(steps, dict):
            raise BadInputError(f"{lock}: not a recipe lock file (no 'steps' table)", path=lock,
                                hint="give the file written by corral recipe run --lock")
        keys.update(str(s["key"]) for s in steps.values() if isinstance(s, dict) and "key" in s)
    return keys


def scan(root: Path, *, locks: list[Path] | None = None, now: float | None = None) -> list[Entry]:
    """Every removable unit of the cache at `root`, with its size, age and protection."""
    now = time.time() if now is None else now
    budget = _Budget()
    entries: list[Entry] = []
    for sub in ("demo", "tokenizer"):
        base = root / sub
        children = sorted(base.iterdir()) if base.is_dir() else []
        entries += [Entry("demos", p, _size(p, budget), _used(p)) for p in children]
    objects = root / "recipes" / "objects"
    staging_running = False
    if objects.is_dir():
        for p in sorted(objects.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".partial"):
                running = now - _used(p) < RUNNING_SECONDS
                staging_running |= running
                entries.append(Entry("staging", p, _size(p, budget), _used(p),
                                     "a recipe is building it" if running else None))
            elif p.is_dir() and p.name != "gates" and not p.name.startswith("."):
                entries.append(Entry("recipe objects", p, _size(p, budget), _used(p)))
    hub = root / "recipes" / "hub"
    for p in sorted(hub.iterdir()) if hub.is_dir() else []:
        partials = p / ".cache" / "corral" / "partial"
        entries.append(Entry("recipe sources", p, _size(p, budget, skip=partials), _used(p)))
        for part in sorted(partials.glob("*.part")) if partials.is_dir() else []:
            entries.append(Entry("download partials", part, _size(part, budget), _used(part)))
    keys = locked_keys(locks or [])
    for e in entries:
        if e.kind != "recipe objects" or e.protected:
            continue
        if e.path.name in keys:
            e.protected = "named by a lock file"
        elif staging_running:
            e.protected = "a recipe is running in this cache"
        elif _linked(e.path, budget):
            e.protected = "published (hard-linked from an output directory)"
    return entries


def info(root: Path) -> dict[str, Any]:
    """Bytes and entries per kind."""
    entries = scan(root)
    kinds = {k: {"bytes": 0, "entries": 0} for k in KINDS}
    for e in entries:
        kinds[e.kind]["bytes"] += e.bytes
        kinds[e.kind]["entries"] += 1
    return {"root": str(root), "bytes": sum(e.bytes for e in entries), "kinds": kinds}


def gc(root: Path, *, keep_days: float | None = 30, max_size: int | None = None, dry_run: bool = False,
       locks: list[Path] | None = None, now: float | None = None) -> GcResult:
    """Remove entries unused for `keep_days`, then the least recently used until the cache fits in
    `max_size` bytes; protected entries stay. Nothing is removed with `dry_run`."""
    now = time.time() if now is None else now
    entries = sorted(scan(root, locks=locks, now=now), key=lambda e: e.last_used)
    result = GcResult(root, dry_run)
    total = sum(e.bytes for e in entries)
    for e in entries:
        old = keep_days is not None and now - e.last_used > keep_days * 86400
        over = max_size is not None and max_size > 0 and total > max_size
        if e.protected is None and (old or over):
            result.removed.append(e)
            total -= e.bytes
        else:
            result.kept.append(e)
    if not dry_run:
        for e in result.removed:
            _remove(e.path)
    return result


def _remove(path: Path) -> None:
    """Remove a file or a tree whose directories may be read-only (unlinking needs a writable directory)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path)
