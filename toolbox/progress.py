"""Progress reporting that library code can use without knowing about terminals.

Library functions take a `Progress` and call `task()`; the CLI passes a rich-backed one,
scripts and tests get `NullProgress` by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None, *,
             unit: str = "items") -> AbstractContextManager[Task]:
        """A task of `total` units; `unit` ("bytes", "tensors", ...) says how a display should count them."""
        ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        return None


class NullProgress:
    """Reports nothing."""

    @contextmanager
    def task(self, description: str, total: float | None = None, *, unit: str = "items") -> Iterator[Task]:
        yield _NullTask()


NULL_PROGRESS = NullProgress()
