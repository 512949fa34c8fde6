"""One output sink for every command: human (rich), JSON (stdout only) or quiet.

In JSON mode stdout carries exactly one JSON document and nothing else; messages,
warnings and progress go to stderr, and progress bars are off.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from toolbox.progress import NullProgress, Task

# C0 controls (but tab), DEL and C1 controls: a file name or server answer must not move the cursor,
# clear the screen or start an escape sequence on the user's terminal, nor break a one-line message.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def one_line(value: object) -> str:
    """`value` as one printable line: control characters (newlines included) and undecodable bytes of a
    file name (lone surrogates) shown as escapes."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def esc(value: object) -> str:
    """Data (a path, a tensor name, a server's text) for a rich markup string: never read as markup."""
    return escape(one_line(value))


def json_document(data: Any) -> str:
    """Strict JSON (jq, JSON.parse): a NaN or infinity in a result (a statistic of NaN weights) becomes null."""
    try:
        return json.dumps(data, indent=2, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), indent=2, default=str, allow_nan=False)


def _finite(value: Any, depth: int = 0) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 64:
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """ "1 file", "2 files", "0 shards": the count with its noun in the right number."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def human_size(n: float) -> str:
    """Bytes in binary units (B, KiB, MiB, GiB, TiB): the one unit system of corral's output, bars included."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


def plain(value: object, style: str = "") -> Text:
    """Data as a rich `Text` (table cells): printed verbatim, whatever brackets it holds."""
    return Text(one_line(value), style=style)


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    verbose: bool = False
    progress_enabled: bool = True
    # emoji=False: a ":thumbs_up:" in a file name is text, like markup in it
    out: Console = field(default_factory=lambda: Console(soft_wrap=True, emoji=False))
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True, emoji=False))

    @property
    def human(self) -> bool:
        return not self.json_mode and not self.quiet

    # Messages carry data (paths, tensor names, server text): printed as Text, never parsed as markup.
    def info(self, message: str) -> None:
        """A human-facing line (stderr), silent in JSON and quiet modes."""
        if self.human:
            self.err.print(plain(message), highlight=False)

    def debug(self, message: str) -> None:
        if self.verbose:
            self.err.print(plain(message, "dim"), highlight=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(Text.assemble(("warning:", "yellow"), " ", plain(message)), highlight=False)

    def error(self, message: str, hint: str | None = None) -> None:
        """One line (plus one hint line), whatever the message holds."""
        self.err.print(Text.assemble(("error:", "bold red"), " ", plain(message)), highlight=False)
        if hint:
            self.err.print(Text.assemble(("hint:", "dim"), " ", plain(hint)), highlight=False)

    def result(self, data: dict[str, Any], render: Callable[[Console], None] | None = None) -> None:
        """Emit a command's result: JSON document, or the human rendering, or nothing (quiet)."""
        if self.json_mode:
            sys.stdout.write(json_document(data) + "\n")
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
    def task(self, description: str, total: float | None = None, *, unit: str = "items") -> Iterator[Task]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if total is None:  # a stage with no count (tracing a graph): a spinner and the time it has taken
            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        else:  # sizes in binary units (MiB, GiB), as every other size corral prints
            columns = [TextColumn("{task.description}"), BarColumn(),
                       DownloadColumn(binary_units=True) if unit == "bytes" else MofNCompleteColumn(),
                       TimeRemainingColumn()]
        with Progress(*columns, console=self._console, transient=True) as progress:
            task_id = progress.add_task(esc(description), total=total)  # the label holds a file name
            yield _RichTask(progress, task_id)
