"""One output sink for every command: human (rich), JSON (stdout only) or quiet.

In JSON mode stdout carries exactly one JSON document and nothing else; messages,
warnings and progress go to stderr, and progress bars are off.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from toolbox.progress import NullProgress, Task


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    verbose: bool = False
    progress_enabled: bool = True
    out: Console = field(default_factory=lambda: Console(soft_wrap=True))
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))

    @property
    def human(self) -> bool:
        return not self.json_mode and not self.quiet

    def info(self, message: str) -> None:
        """A human-facing line (stderr), silent in JSON and quiet modes."""
        if self.human:
            self.err.print(message, highlight=False)

    def debug(self, message: str) -> None:
        if self.verbose:
            self.err.print(f"[dim]{message}[/dim]", highlight=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def error(self, message: str, hint: str | None = None) -> None:
        self.err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
        if hint:
            self.err.print(f"[dim]hint:[/dim] {hint}", highlight=False)

    def result(self, data: dict[str, Any], render: Callable[[Console], None] | None = None) -> None:
        """Emit a command's result: JSON document, or the human rendering, or nothing (quiet)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif not self.quiet and render is not None:
            render(self.out)

    def progress(self) -> RichProgress | NullProgress:
        if self.human and self.progress_enabled and self.err.is_terminal:
            return RichProgress(self.err)
        return NullProgress()


class _RichTask:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task_id, amount)


class RichProgress:
    """Progress bars on stderr (only used when stderr is a terminal)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        is_bytes = description.endswith("(bytes)")
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn() if is_bytes else MofNCompleteColumn(),
            TimeRemainingColumn(),
        ]
        label = description.removesuffix(" (bytes)")
        with Progress(*columns, console=self._console, transient=True) as progress:
            task_id = progress.add_task(label, total=total)
            yield _RichTask(progress, task_id)
