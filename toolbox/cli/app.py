"""The Typer application: global options and one sub-module per noun. Wiring only."""

from __future__ import annotations

from typing import Annotated

from toolbox import __version__
from toolbox.cli import (
    convert_cmd,
    demo_cmd,
    download_cmd,
    experts_cmd,
    inspect_cmd,
    license_cmd,
    merge_cmd,
    recipe_cmd,
    verify_cmd,
)
from toolbox.cli._typer import typer
from toolbox.cli.output import Output

EPILOG = """\
Exit codes: 0 ok, 1 checks found problems, 2 usage error (or an unusable output
location), 3 bad input, 4 the environment refused (access, auth, network, permission,
read-only file system, disk full), 5 refused by license policy. --json prints one JSON
document on stdout for every exit, errors included.

Examples:

  corral convert demo:scout --to gguf -o llama-4-scout-demo.gguf

  corral demo create ./tiny-scout --variant scout

  corral inspect demo:scout

  corral --json verify ./Llama-4-Scout-17B-16E-Instruct
"""

app = typer.Typer(
    name="corral",
    help="Toolbox for Llama 4 checkpoints (Scout, Maverick): inspect, verify, convert, merge, "
    "prune, and keep the Llama 4 license obligations in every output.",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def output_for(*, json_mode: bool = False, quiet: bool = False, verbose: bool = False,
               progress: bool = True) -> Output:
    return Output(json_mode=json_mode, quiet=quiet, verbose=verbose, progress_enabled=progress)


def _version(value: bool) -> None:
    if value:
        print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    json_mode: Annotated[bool, typer.Option("--json", help="Machine output: one JSON document on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = output_for(json_mode=json_mode, quiet=quiet, verbose=verbose, progress=not no_progress)


app.command("inspect", epilog=inspect_cmd.EPILOG)(inspect_cmd.inspect)
app.command("verify", epilog=verify_cmd.EPILOG)(verify_cmd.verify)
app.command("convert", epilog=convert_cmd.EPILOG)(convert_cmd.convert)
app.command("merge", epilog=merge_cmd.EPILOG)(merge_cmd.merge)
app.command("download", epilog=download_cmd.EPILOG)(download_cmd.download)
app.add_typer(demo_cmd.app, name="demo")
app.add_typer(experts_cmd.app, name="experts")
app.add_typer(license_cmd.app, name="license")
app.add_typer(recipe_cmd.app, name="recipe")
