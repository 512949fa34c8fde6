"""`corral download`: gated Llama weights from the Hub, checked before and after the transfer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.output import esc

if TYPE_CHECKING:
    from toolbox.hub.client import DownloadResult

EPILOG = """\
Before any weight byte moves: the revision is resolved to a commit, access is checked
(exit 4 with the fix: log in, request access, wrong id or revision, network), the Llama
license must be accepted once per repository (exit 5 until --accept-license or
CORRAL_ACCEPT_LLAMA_LICENSE=1), and free disk space is checked (exit 3). original/ is
skipped unless --include-original. Re-running resumes partial files and fetches only what
is missing or fails its sha256 check. HF_TOKEN, HF_ENDPOINT and `hf auth login` apply.

Every request is bounded (exit 4 with the URL when a server breaks a bound):
CORRAL_HUB_TIMEOUT (default 30 s: connect, each read, each whole API answer),
CORRAL_HUB_DEADLINE (default 86400 s: the whole download), CORRAL_HUB_MAX_FILES (default
20000 listing entries); at most 10 redirects; no file gets more bytes than its listed size.

Examples:

  corral download meta-llama/Llama-4-Scout-17B-16E-Instruct --dry-run

  corral download meta-llama/Llama-4-Scout-17B-16E-Instruct -o ./scout --accept-license

  corral download meta-llama/Llama-4-Maverick-17B-128E-Instruct --include 'config.json' --include 'tokenizer*'

  HF_ENDPOINT=https://hf-mirror.example corral --json download meta-llama/Llama-4-Scout-17B-16E-Instruct
"""


def download(
    ctx: typer.Context,
    repo_id: Annotated[str, typer.Argument(help="Hub repository id, e.g. meta-llama/Llama-4-Scout-17B-16E-Instruct.",
                                           metavar="REPO_ID", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", show_default=False,
                                                help="Directory to download into (default: ./<repository name>); "
                                                "re-running into it resumes.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", show_default=False,
                                                 help="Branch, tag or commit (default: main).")] = None,
    include: Annotated[list[str] | None, typer.Option("--include", metavar="GLOB", show_default=False,
                                                      help="Only files matching this glob (repeatable; * crosses /).")
                       ] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", show_default=False,
                                                      help="Skip files matching this glob (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be fetched, with sizes; fetch nothing.")]
    = False,
    max_workers: Annotated[int, typer.Option("--max-workers", min=1, help="Files fetched in parallel.")] = 8,
    token: Annotated[str | None, typer.Option("--token", show_default=False,
                                              help="Hub token (default: HF_TOKEN, else the `hf auth login` token). "
                                              "Prefer HF_TOKEN: a command line is visible to other users.")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license",
                                                 help="Accept the Llama license shown (recorded once per "
                                                 "repository; CI: CORRAL_ACCEPT_LLAMA_LICENSE=1).")] = False,
    include_original: Annotated[bool, typer.Option("--include-original",
                                                   help="Also fetch original/ (Meta's native-format second copy of "
                                                   "the weights).")] = False,
) -> int:
    """Download a Hub model repository: access and license checked first, selective,
    resumable, every file's sha256 checked, with a corral-manifest.json for provenance."""
    from toolbox.hub.client import LicenseNotAcceptedError
    from toolbox.hub.client import download as hub_download

    out = ctx.obj
    try:
        result = hub_download(repo_id, output, revision=revision, include=include, exclude=exclude,
                              dry_run=dry_run, max_workers=max_workers, token=token,
                              accept_license=accept_license, include_original=include_original,
                              progress=out.progress())
    except LicenseNotAcceptedError as exc:
        if not out.quiet:
            out.err.print(exc.summary, highlight=False, markup=False)
        raise
    if result.license_newly_accepted and result.license.summary:
        out.info(f"License accepted ({result.acceptance.via if result.acceptance else ''}), recorded for "
                 f"{repo_id}:")
        if out.human:
            out.err.print(result.license.summary, highlight=False, markup=False)
    out.result(result.to_dict(), lambda console: _render(result, console))
    return 0


def _render(result: DownloadResult, console: Console) -> None:
    from toolbox.cli.output import human_size, plural

    head = esc(f"{result.repo_id} @ {result.commit[:12]} ({result.revision}) -> {result.out_dir}")
    console.print(("[bold]dry run[/bold] " if result.dry_run else "") + head, highlight=False)
    for f in result.files:
        style = {"fetch": "cyan", "resume": "cyan", "fetched": "green", "verify": "yellow"}.get(f.action, "dim")
        console.print(f"  [{style}]{f.action:8}[/{style}] {human_size(f.size):>9}  {esc(f.path)}", highlight=False)
    n_fetch = sum(1 for f in result.files if f.action in ("fetch", "resume", "fetched"))
    if result.dry_run:
        fits = "" if result.free_bytes is None or result.bytes_to_fetch <= result.free_bytes else \
            " [red](does not fit)[/red]"
        console.print(f"{plural(len(result.files), 'file')}, {human_size(result.bytes_total)}; would fetch {n_fetch} "
                      f"({human_size(result.bytes_to_fetch)}), {human_size(result.free_bytes or 0)} free{fits}",
                      highlight=False)
        if result.license_required:
            console.print(f"[yellow]license:[/yellow] {esc(result.license.display_name)} must be accepted: add "
                          "--accept-license", highlight=False)
        return
    console.print(f"[green]OK[/green] {plural(len(result.files), 'file')}, {human_size(result.bytes_total)} "
                  f"(fetched {n_fetch}, {human_size(result.bytes_fetched)}; sha256 verified); manifest "
                  f"{esc(result.manifest)}", highlight=False)
    for note in result.notes:  # e.g. a transfer resumed after a cut connection: said once, here
        console.print(f"  [dim]note:[/dim] {esc(note)}", highlight=False)
