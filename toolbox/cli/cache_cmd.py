"""`corral cache`: what the cache holds (by kind) and a garbage collector that respects lock files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.output import esc, human_size, plural

app = typer.Typer(help="The corral cache: demos, recipe steps, downloads' partials.", no_args_is_help=True)

INFO_EPILOG = """\
The cache is $CORRAL_CACHE_DIR (or corral config set cache_dir DIR), else $XDG_CACHE_HOME/corral,
else ~/.cache/corral.

Examples:

  corral cache info

  corral --json cache info | jq '.kinds["recipe objects"].bytes'
"""

GC_EPILOG = """\
Removes what was not used for --keep-days (default 30), then the least recently used until the
cache fits in --max-size. Never removed: objects a --lock file names, objects a publish directory
still hard-links, and every recipe object while a recipe is building in the cache.

Examples:

  corral cache gc --dry-run

  corral cache gc --keep-days 7 --max-size 200GiB --lock scout-gguf.lock
"""

CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", show_default=False,
                                                  help="The cache (default: as below).")]


def _root(cache_dir: Path | None) -> Path:
    from toolbox.demo import cache_dir as default

    return cache_dir or default()


@app.command("info", epilog=INFO_EPILOG)
def info(ctx: typer.Context, cache_dir: CacheDirOpt = None) -> None:
    """Size of the cache by kind: demos, recipe objects and sources, download partials, staging."""
    from toolbox.cache import info as cache_info

    data = cache_info(_root(cache_dir))

    def render(c: Console) -> None:
        c.print(f"{esc(data['root'])}: {human_size(data['bytes'])}", highlight=False)
        for kind, k in data["kinds"].items():
            c.print(f"  {kind:18} {human_size(k['bytes']):>11}  {plural(k['entries'], 'entry', 'entries')}",
                    highlight=False)

    ctx.obj.result(data, render)


@app.command("gc", epilog=GC_EPILOG)
def gc(
    ctx: typer.Context,
    keep_days: Annotated[float, typer.Option("--keep-days", min=0, help="Keep what was used in the last N days.")]
    = 30,
    max_size: Annotated[str | None, typer.Option("--max-size", metavar="SIZE", show_default=False,
                                                 help="Then trim to this size, least recently used first "
                                                 "(e.g. 200GiB, 50G).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
    lock: Annotated[list[Path] | None, typer.Option("--lock", metavar="FILE", show_default=False,
                                                    help="A recipe lock file whose objects are kept "
                                                    "(repeatable).")] = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Remove old cache entries, keeping everything a lock file or a running recipe needs."""
    from toolbox.cache import gc as cache_gc
    from toolbox.tensors.sink import parse_size

    limit = parse_size(max_size) if max_size is not None else None
    result = cache_gc(_root(cache_dir), keep_days=keep_days, max_size=limit, dry_run=dry_run, locks=lock or [])

    def render(c: Console) -> None:
        verb = "would remove" if dry_run else "removed"
        for e in result.removed:
            c.print(f"  {verb} {e.kind}: {esc(e.path)} ({human_size(e.bytes)})", highlight=False)
        for e in result.kept:
            if e.protected:
                c.print(f"  [dim]kept {esc(e.path.name)}: {esc(e.protected)}[/dim]", highlight=False)
        freed = sum(e.bytes for e in result.removed)
        c.print(f"{verb} {plural(len(result.removed), 'entry', 'entries')} ({human_size(freed)}); "
                f"{human_size(sum(e.bytes for e in result.kept))} kept", highlight=False)

    ctx.obj.result(result.to_dict(), render)
