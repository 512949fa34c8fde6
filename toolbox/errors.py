"""Errors corral raises on purpose, each with the exit code the CLI maps it to.

Scripts catch `CorralError` (or a subclass); the CLI turns it into one line naming the
file and the fix. Anything else reaching the CLI is a bug in corral, not in the input.
"""

from __future__ import annotations

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
