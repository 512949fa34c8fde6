"""The Typer application: global options and one sub-module per noun. Wiring only."""

from __future__ import annotations

from typing import Annotated, Any

from toolbox import __version__
from toolbox.cli import (
    bom_cmd,
    cache_cmd,
    config_cmd,
    convert_cmd,
    demo_cmd,
    download_cmd,
    eval_cmd,
    experts_cmd,
    extract_lora_cmd,
    imatrix_cmd,
    inspect_cmd,
    license_cmd,
    merge_cmd,
    publish_cmd,
    recipe_cmd,
    report_cmd,
    sign_cmd,
    verify_cmd,
)
from toolbox.cli._typer import typer
from toolbox.cli.output import Output

EPILOG = """\
Exit codes: 0 ok, 1 checks found problems, 2 usage error (or an unusable output
location), 3 bad input, 4 the environment refused (access, auth, network, permission,
read-only file system, disk full), 5 refused by license policy. --json prints one JSON
document on stdout for every exit, errors included. The options above may also follow the
subcommand (corral inspect X --json). Persistent settings: corral config set KEY VALUE.

Examples:

  corral convert demo:scout --to gguf -o llama-4-scout-demo.gguf

  corral demo create ./tiny-scout --variant scout

  corral inspect demo:scout

  corral --json verify ./Llama-4-Scout-17B-16E-Instruct

  corral config set mau_declaration below-700m
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


GLOBAL_FLAGS = frozenset({"--json", "--quiet", "-q", "--verbose", "-v", "--no-progress"})


def command() -> Any:
    """The Click command tree of `app` (built per run: tests and plugins may register commands)."""
    return typer.main.get_command(app)


def hoist_global_options(args: list[str], root: Any) -> list[str]:
    """Move global flags given after a subcommand (`corral inspect X --json`) to the front.

    The command tree is walked as Click will parse it, so a flag that is the value of an option
    (`--name -v`) or comes after `--` stays where it is, as does a flag a subcommand defines itself.
    """
    hoisted: list[str] = []
    kept: list[str] = []
    current = root
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            kept.append(token)
            kept.extend(tokens)
            break
        commands = getattr(current, "commands", None)
        if commands is not None and not token.startswith("-") and token in commands:
            current = commands[token]
        elif current is not root and token in GLOBAL_FLAGS and _option(current, token) is None:
            hoisted.append(token)
            continue
        else:
            opt = _option(current, token)
            if opt is not None and not (opt.is_flag or opt.count) and "=" not in token:
                kept.append(token)
                kept.extend(next(tokens, None) for _ in range(max(opt.nargs, 1)))
                kept[:] = [k for k in kept if k is not None]
                continue
        kept.append(token)
    return hoisted + kept


def _option(cmd: Any, token: str) -> Any:
    """The option of `cmd` that `token` (`--to`, `-o`, `--to=gguf`) names, or None."""
    name = token.split("=", 1)[0]
    for param in getattr(cmd, "params", ()):
        if name in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())) and \
                getattr(param, "param_type_name", "") == "option":
            return param
    return None


app.command("inspect", epilog=inspect_cmd.EPILOG)(inspect_cmd.inspect)
app.command("verify", epilog=verify_cmd.EPILOG)(verify_cmd.verify)
app.command("convert", epilog=convert_cmd.EPILOG)(convert_cmd.convert)
app.command("merge", epilog=merge_cmd.EPILOG)(merge_cmd.merge)
app.command("extract-lora", epilog=extract_lora_cmd.EPILOG)(extract_lora_cmd.extract_lora)
app.command("download", epilog=download_cmd.EPILOG)(download_cmd.download)
app.command("sign", epilog=sign_cmd.EPILOG)(sign_cmd.sign)
app.command("bom", epilog=bom_cmd.EPILOG)(bom_cmd.bom)
app.command("imatrix", epilog=imatrix_cmd.EPILOG)(imatrix_cmd.imatrix)
app.command("eval", epilog=eval_cmd.EPILOG)(eval_cmd.eval_gguf)
app.command("report", epilog=report_cmd.EPILOG)(report_cmd.report)
app.command("publish", epilog=publish_cmd.EPILOG)(publish_cmd.publish)
app.add_typer(demo_cmd.app, name="demo")
app.add_typer(experts_cmd.app, name="experts")
app.add_typer(license_cmd.app, name="license")
app.add_typer(recipe_cmd.app, name="recipe")
app.add_typer(config_cmd.app, name="config")
app.add_typer(cache_cmd.app, name="cache")
