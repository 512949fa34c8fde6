"""The one place that imports Typer and its Click layer.

Typer 0.26+ vendors Click as `typer._click` (and defines Abort/Exit itself); older releases
use the `click` package. Everything else in corral imports these names from here, so a
Typer upgrade touches one file.
"""

from __future__ import annotations

import typer

try:  # Typer >= 0.26
    from typer._click.exceptions import ClickException
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older Typer
    from click.exceptions import ClickException  # type: ignore[no-redef]
    from click.exceptions import UsageError as ClickUsageError  # type: ignore[no-redef]

ClickAbort = typer.Abort
ClickExit = typer.Exit

__all__ = ["ClickAbort", "ClickException", "ClickExit", "ClickUsageError", "typer"]
