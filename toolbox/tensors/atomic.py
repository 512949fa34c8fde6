"""Atomic outputs: build in a hidden staging path beside the target, rename when complete.

Until the rename, nothing at the target path exists (or the user's previous output is
untouched); a crash or kill leaves only a `.NAME.corral-partial-*` directory or file, which
no tool mistakes for a checkpoint. Each partial is owned by the run that made it through an
flock on the partial itself, held while it exists (the kernel drops it when the run dies, even
on SIGKILL); the next run that writes the same target removes the partials nobody holds.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolbox.errors import (
    BadInputError,
    DiskFullError,
    OutputExistsError,
    OutputLocationError,
    UsageError,
    from_os_error,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: partials are not locked, and none is ever removed
    fcntl = None  # type: ignore[assignment]

PARTIAL_MARK = ".corral-partial-"
NEW_MARK = ".corral-new-"  # a partial being born: renamed to PARTIAL_MARK once its lock is held
OLD_MARK = ".corral-old-"  # a replaced output on its way out
# Bytes that corral adds to an output's name: `.NAME.corral-partial-XXXXXXXX`, `-00001-of-00009`, `.mmproj`.
NAME_RESERVE = 40
STALE_SCAN_LIMIT = 100_000  # directory entries looked at when removing dead runs' partials
FREE_SPACE_MARGIN = 1 << 20  # bytes kept free besides what a write needs (metadata, sidecar files)

_owned: dict[str, int] = {}  # partial path -> fd holding its flock, for the life of the partial
_owned_lock = threading.Lock()


def check_output_path(target: Path, *, force: bool) -> None:
    """Refuse early (before any work) when the output exists and --force is absent, or when its
    location cannot hold it: a parent that is a file, a name too long, a directory nobody can write."""
    target = Path(target).absolute()
    _check_exists(target, force=force)
    check_output_location(target)


def _check_exists(target: Path, *, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(
                f"{target} already exists", hint="choose another output path or pass --force to replace it"
            )
        if target.is_symlink():
            raise UsageError(f"{target} is a symbolic link; refusing to replace it", hint="remove it first")


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` (itself excluded) that exists."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(path.anchor or "/")


def check_output_location(target: Path) -> None:
    """OutputLocationError (exit 2) or an EnvironmentFailure (exit 4) unless files can be created beside target."""
    target = Path(target).absolute()
    name = os.fsencode(target.name)
    if not name:
        raise OutputLocationError(f"{target}: not a file or directory name", hint="name the output, e.g. -o ./out")
    ancestor = _existing_ancestor(target)
    if not ancestor.is_dir():
        raise OutputLocationError(f"{target}: {ancestor} is not a directory",
                                  hint="choose an output path whose parent is a directory", path=target)
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(name) + NAME_RESERVE > name_max:
        raise OutputLocationError(f"{target.name[:40]}...: the output name is {len(name)} bytes long; at most "
                                  f"{name_max - NAME_RESERVE} fit in {ancestor}", hint="choose a shorter name",
                                  path=target)
    _probe(ancestor, target)


def _probe(directory: Path, target: Path) -> None:
    """Create and remove one empty file in `directory`: the only reliable test that the output can be written
    (permissions, read-only mounts, immutable flags, quotas, virtual file systems such as /proc)."""
    probe = directory / f".{target.name}.corral-probe-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        err = from_os_error(exc)
        if isinstance(err, BadInputError):  # ENOENT in an existing directory: proc, sysfs and friends
            raise OutputLocationError(f"{target}: files cannot be created in {directory} ({exc.strerror})",
                                      hint="write the output to a directory on a disk", path=target) from None
        err.message = f"{target}: cannot create files in {directory}: {exc.strerror}"
        err.path = str(target)
        raise err from None
    os.close(fd)
    os.unlink(probe)


def ensure_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Refuse before writing `need_bytes` under `path` when its file system lacks them (DiskFullError, exit 4),
    rather than failing with ENOSPC hours into the write."""
    where = Path(path).absolute()
    where = where if where.is_dir() else _existing_ancestor(where)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no answer (a FUSE mount): the write itself will tell
    need = int(need_bytes) + FREE_SPACE_MARGIN
    if need > free:
        raise DiskFullError(f"{what} needs {_human(need_bytes)} but {where} has {_human(free)} free",
                            hint="free space there, or write the output to another file system (-o)", path=where)


def _human(n: int) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


# -- owned partials -----------------------------------------------------------------------------
def new_partial(target: str | Path, *, directory: bool, tag: str = "") -> Path:
    """Create `.NAME.corral-partial-*` (a directory or an empty file) beside `target`, owned by this run.

    Dead runs' partials of the same target are removed first. The partial is born under a
    `.corral-new-` name and renamed only once its flock is held, so no other run ever sees an
    unowned partial. The lock lives until `release_partial`, or until the partial is gone (renamed
    into place or deleted): the next `new_partial` call closes locks of vanished partials.
    """
    target = Path(target).absolute()
    _release_vanished()
    remove_stale_partials(target)
    return _born_locked(target, PARTIAL_MARK, tag, directory=directory)


def _born_locked(target: Path, mark: str, tag: str, *, directory: bool) -> Path:
    """`.NAME{mark}{tag}XXXXXXXX` beside target, created under NEW_MARK and renamed once its flock is held."""
    prefix = f".{target.name}{NEW_MARK}{tag}"
    if directory:
        born = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        born = Path(name)
    final = target.parent / f".{target.name}{mark}{tag}{born.name[len(prefix):]}"
    lock_fd = -1
    try:
        lock_fd = _lock(born, directory) if fcntl is not None else -1
        os.rename(born, final)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        if directory:
            shutil.rmtree(born, ignore_errors=True)
        else:
            born.unlink(missing_ok=True)
        raise
    if lock_fd >= 0:
        with _owned_lock:
            _owned[str(final)] = lock_fd
    return final


def release_partial(path: str | Path) -> None:
    """Drop this run's lock on a partial (after it was renamed into place or removed)."""
    with _owned_lock:
        fd = _owned.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def _release_vanished() -> None:
    with _owned_lock:
        gone = [p for p in _owned if not os.path.lexists(p)]
        fds = [_owned.pop(p) for p in gone]
    for fd in fds:
        os.close(fd)


def _lock(path: Path, directory: bool) -> int:
    """An fd holding an exclusive flock on `path`, or -1 where the file system has no locks (then no run
    ever removes this partial: the cleaner's own flock fails there the same way)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove the partials of `target` whose owner is dead (nobody holds their lock); never a live run's."""
    if fcntl is None:
        return []
    target = Path(target).absolute()
    heads = (f".{target.name}{PARTIAL_MARK}", f".{target.name}{NEW_MARK}")
    old_head = f".{target.name}{OLD_MARK}"
    removed: list[Path] = []
    try:
        entries = os.scandir(target.parent)
    except OSError:
        return removed
    with entries:
        for i, entry in enumerate(entries):
            if i >= STALE_SCAN_LIMIT:
                break
            name = entry.name
            # a replaced output's leftovers are garbage only once the new output is in place
            if name.startswith(heads) or (name.startswith(old_head) and os.path.lexists(target)):
                path = Path(entry.path)
                if _remove_if_dead(path, young_ok=NEW_MARK not in name[len(target.name) + 1:]):
                    removed.append(path)
    return removed


def _remove_if_dead(path: Path, *, young_ok: bool) -> bool:
    with _owned_lock:
        if str(path) in _owned:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    is_dir = stat.S_ISDIR(st.st_mode)
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        return False  # symlinks, fifos, sockets: not ours
    if not young_ok and time.time() - st.st_mtime < 60:
        return False  # a partial being born (locked within microseconds): leave it
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live run holds it
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return not os.path.lexists(path)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `target` in one rename."""
    target = Path(target).absolute()
    check_output_path(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_partial(target, directory=True)
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if fsync:
            _fsync_tree(staging)
        _check_exists(target, force=force)
        if target.exists():
            old = _born_locked(target, OLD_MARK, "", directory=True)  # locked: no other run removes it
            try:
                os.rename(target, old / "previous")
                try:
                    os.rename(staging, target)
                except BaseException:
                    os.rename(old / "previous", target)  # the user's output stays where it was
                    raise
            finally:
                if target.exists() or not (old / "previous").exists():  # never the only copy of it
                    shutil.rmtree(old, ignore_errors=True)
                release_partial(old)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        release_partial(staging)


@contextmanager
def atomic_file(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it becomes `target` (os.replace)."""
    target = Path(target).absolute()
    check_output_path(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = new_partial(target, directory=False)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _check_exists(target, force=force)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        release_partial(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safe_join(root: Path, relative: str) -> Path:
    """Join a path from untrusted input (an index, a repo listing) under root, refusing escapes."""
    candidate = (root / relative).resolve()
    base = root.resolve()
    if os.path.isabs(relative) or (candidate != base and base not in candidate.parents):
        raise BadInputError(f"refusing path {relative!r}: it escapes {root}")
    return candidate
