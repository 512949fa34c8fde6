"""Atomic outputs: build in a hidden staging path beside the target, rename when complete.

Until the rename, nothing at the target path exists (or the user's previous output is
untouched); a crash or kill leaves only a `.NAME.corral-partial-*` directory, which no
tool mistakes for a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolbox.errors import BadInputError, OutputExistsError, UsageError

PARTIAL_MARK = ".corral-partial-"


def check_output_path(target: Path, *, force: bool) -> None:
    """Refuse early (before any work) when the output exists and --force is absent."""
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(
                f"{target} already exists", hint="choose another output path or pass --force to replace it"
            )
        if target.is_symlink():
            raise UsageError(f"{target} is a symbolic link; refusing to replace it", hint="remove it first")


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
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARK}", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        if fsync:
            _fsync_tree(staging)
        check_output_path(target, force=force)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.corral-old-", dir=target.parent))
            os.rename(target, old / "previous")
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it becomes `target` (os.replace)."""
    target = Path(target).absolute()
    check_output_path(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{PARTIAL_MARK}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        check_output_path(target, force=force)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


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
