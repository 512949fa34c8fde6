"""Errors corral raises on purpose, each with the exit code the CLI maps it to.

Scripts catch `CorralError` (or a subclass); the CLI turns it into one line naming the
file and the fix. Anything else reaching the CLI is a bug in corral, not in the input.
"""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0
    FINDINGS = 1  # checks ran and found problems (verify, license check)
    USAGE = 2  # bad command line: unknown option, conflicting flags, output exists
    BAD_INPUT = 3  # unreadable, corrupt or mismatched input files
    ACCESS = 4  # access, authentication or network failure
    LICENSE = 5  # refused by license policy
    INTERNAL = 70  # a bug in corral (EX_SOFTWARE)
    INTERRUPTED = 130


class CorralError(Exception):
    """Base of every error corral raises deliberately.

    `message` says what is wrong (naming the file when there is one), `hint` says how to fix it.
    """

    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = str(path) if path is not None else None

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def to_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "path": self.path,
            "exit_code": int(self.exit_code),
        }


class UsageError(CorralError):
    """The command line asks for something impossible or ambiguous."""

    exit_code = ExitCode.USAGE


class OutputExistsError(UsageError):
    """The output path exists and `--force` was not given: never overwrite silently."""


class BadInputError(CorralError):
    """An input file or directory cannot be used as given."""

    exit_code = ExitCode.BAD_INPUT


class CorruptFileError(BadInputError):
    """A file is truncated, malformed or internally inconsistent."""


class UnsupportedModelError(BadInputError):
    """The input is not a Llama 4 checkpoint (or a layout corral does not read)."""


class ConfigError(BadInputError):
    """config.json is missing, unparsable, or lacks fields a Llama 4 model needs."""


class TokenizerError(BadInputError):
    """The tokenizer files are missing or cannot be loaded."""


class AccessError(CorralError):
    """Authentication, gated access or network failures."""

    exit_code = ExitCode.ACCESS


class LicensePolicyError(CorralError):
    """The license policy refuses the operation (name, declaration, missing texts)."""

    exit_code = ExitCode.LICENSE


class Interrupted(CorralError):
    """Ctrl-C (or SIGINT from CI): nothing half-written is left at the output path."""

    exit_code = ExitCode.INTERRUPTED


class InternalError(CorralError):
    """Anything that is not a CorralError nor an environment failure: a bug in corral."""

    exit_code = ExitCode.INTERNAL


class InvalidSizeError(UsageError, ValueError):
    """A size on the command line or in a recipe (`--split-max-size`) that is not one (also a ValueError, for
    callers that validate sizes themselves)."""


class EnvironmentFailure(CorralError):
    """The machine refused: permission denied, read-only file system, disk full, quota, open-file limit."""

    exit_code = ExitCode.ACCESS


class PermissionDeniedError(EnvironmentFailure):
    """A path cannot be read or written by this user (EACCES, EPERM, an immutable file)."""


class ReadOnlyFileSystemError(EnvironmentFailure):
    """The output location is on a read-only file system (EROFS)."""


class DiskFullError(EnvironmentFailure):
    """No space left on the device (ENOSPC), or the user's quota is exhausted (EDQUOT)."""


class ResourceLimitError(EnvironmentFailure):
    """A per-process or system limit was hit (EMFILE, ENFILE, ENOMEM, EFBIG)."""


class OutputLocationError(UsageError):
    """The output path the command line chose cannot hold a file: under a file, too long, a virtual file system."""


class InputReadError(BadInputError):
    """An input could not be read (EIO and other read failures): the file or its device is damaged."""


# errno -> (error class, hint). Output-location problems are the command line's (exit 2); what the
# machine refuses is the environment's (exit 4); anything else an I/O failure on the input (exit 3).
_ERRNO_CLASSES: dict[str, tuple[type[CorralError], str]] = {
    "ENOSPC": (DiskFullError, "free space on that file system, or write the output elsewhere (-o)"),
    "EDQUOT": (DiskFullError, "your disk quota is exhausted: free space, or write the output elsewhere (-o)"),
    "EACCES": (PermissionDeniedError, "check the permissions, or choose a path you can write to (-o)"),
    "EPERM": (PermissionDeniedError, "the file is protected (permissions, immutable flag); choose another path"),
    "EROFS": (ReadOnlyFileSystemError, "that file system is mounted read-only: write the output elsewhere (-o)"),
    "ENOTDIR": (OutputLocationError, "a component of the path is a file, not a directory: choose another path"),
    "ENAMETOOLONG": (OutputLocationError, "use a shorter file name (at most about 200 bytes)"),
    "EISDIR": (OutputLocationError, "the path is a directory where a file is expected: choose a file name"),
    "EEXIST": (OutputLocationError, "the path exists: choose another one or pass --force"),
    "ELOOP": (OutputLocationError, "the path contains a symbolic-link loop: choose another path"),
    "EMFILE": (ResourceLimitError, "too many open files: raise the limit (ulimit -n) and retry"),
    "ENFILE": (ResourceLimitError, "the system's open-file table is full: retry later"),
    "ENOMEM": (ResourceLimitError, "the system is out of memory: close other programs or use a larger machine"),
    "EFBIG": (ResourceLimitError, "the file system cannot hold a file this large: split the output or write "
              "it elsewhere"),
    "ENOENT": (BadInputError, "check the path"),
    "ENXIO": (BadInputError, "the path is a device or socket, not a file"),
    "ETIMEDOUT": (AccessError, "the network timed out: check the connection and retry"),
    "ECONNREFUSED": (AccessError, "the server refused the connection: check the endpoint (HF_ENDPOINT)"),
    "ECONNRESET": (AccessError, "the connection was reset: retry"),
    "ENETUNREACH": (AccessError, "the network is unreachable: check the connection"),
    "EHOSTUNREACH": (AccessError, "the host is unreachable: check the connection"),
}


_WRITE_SIDE = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EFBIG"})


def from_os_error(exc: OSError) -> CorralError:
    """An OSError from anywhere in corral as the documented error for its errno, naming the path.

    For a copy (two file names) that failed on the write side, the destination is named; a hidden
    staging path (`.NAME.corral-partial-*`) is named by the output it stands for."""
    import errno as errno_mod

    name = errno_mod.errorcode.get(exc.errno or 0, "")
    default = (AccessError, "the network failed: check the connection and retry") if isinstance(
        exc, (TimeoutError, ConnectionError)) else (InputReadError, "the file or its device could not be read: "
                                                    "check it (dmesg) and retry")
    cls, hint = _ERRNO_CLASSES.get(name, default)
    first, second = exc.filename, exc.filename2
    path = second if second is not None and (name in _WRITE_SIDE or first is None) else first
    what = exc.strerror or str(exc) or type(exc).__name__
    shown = _public_path(path) if path is not None else None
    where = f"{shown}: " if shown is not None else ""
    return cls(f"{where}{what}" + (f" ({name})" if name else ""), hint=hint, path=shown)


def _public_path(path: object) -> str:
    """`/out/.model.corral-partial-x1y2/model.gguf` -> `/out/model` (what the user asked for)."""
    import re

    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return re.sub(r"/\.([^/]{1,255}?)\.corral-(?:partial|new)-[^/]{0,255}(?:/.*)?$", r"/\1", text)
