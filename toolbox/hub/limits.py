"""How far `corral download` trusts a Hub endpoint: every wait and every size has a bound.

A Hub-compatible mirror (`HF_ENDPOINT`) is a stranger's server: it may never answer, answer
slowly, redirect forever, list millions of files or send more bytes than it listed. The bounds
here apply to every request corral makes; the time bounds are configurable from the
environment (README, "Download"):

- CORRAL_HUB_TIMEOUT (seconds, default 30): the longest wait for a connection, for the next
  bytes of any answer, and for a whole API answer (model info, file listing, access check).
- CORRAL_HUB_DEADLINE (seconds, default 86400): the whole download, transfers included.
- CORRAL_HUB_MAX_FILES (default 20000): entries a repository listing may have.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from toolbox.errors import UsageError

TIMEOUT_ENV = "CORRAL_HUB_TIMEOUT"
DEADLINE_ENV = "CORRAL_HUB_DEADLINE"
MAX_FILES_ENV = "CORRAL_HUB_MAX_FILES"

DEFAULT_TIMEOUT = 30.0
DEFAULT_DEADLINE = 24 * 3600.0
DEFAULT_MAX_FILES = 20_000
MAX_REDIRECTS = 10  # huggingface.co needs 1 (resolve -> CDN), a renamed repository 2
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # one API answer (a listing page is ~300 kB on huggingface.co)
MAX_LISTING_BYTES = 64 * 1024 * 1024  # all pages of one listing together
MAX_JSON_DEPTH = 32  # the Hub's answers nest 4 levels deep
MAX_ERROR_BODY = 64 * 1024  # what is read of an error answer, for its message
STALL_BYTES = 64 * 1024  # a transfer must move this much (or finish) within each timeout window
MAX_RESUMES = 20  # a file's transfer is resumed after a cut connection at most this often per run
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class HubLimits:
    """The bounds of one download; `from_env()` reads the configurable ones."""

    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DEADLINE
    max_files: int = DEFAULT_MAX_FILES
    max_redirects: int = MAX_REDIRECTS
    max_answer_bytes: int = MAX_ANSWER_BYTES
    max_listing_bytes: int = MAX_LISTING_BYTES
    retry_wait: float = 0.5  # before resuming a cut transfer (times the attempt number)

    @classmethod
    def from_env(cls) -> HubLimits:
        return cls(timeout=_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT), deadline=_seconds(DEADLINE_ENV, DEFAULT_DEADLINE),
                   max_files=_count(MAX_FILES_ENV, DEFAULT_MAX_FILES))


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 10 * 365 * 86400:
        raise UsageError(f"{name}={raw[:40]!r} is not a number of seconds", hint=f"set {name} to e.g. 30 or 0.5")
    return value


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw[:12]) <= 10_000_000:
        raise UsageError(f"{name}={raw[:40]!r} is not a file count", hint=f"set {name} to e.g. {DEFAULT_MAX_FILES}")
    return int(raw)


class Deadline:
    """The end of the whole download, on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.left() <= 0
