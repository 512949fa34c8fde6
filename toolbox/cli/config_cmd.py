"""`corral config`: persistent settings (user file, project corral.toml), shown with their origin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.output import esc

app = typer.Typer(help="Persistent settings: the MAU declaration, the cache directory.", no_args_is_help=True)

_KEYS = """\
Settings: mau_declaration (CORRAL_MAU_DECLARATION), cache_dir (CORRAL_CACHE_DIR). Precedence,
highest first: the command-line flag, the environment variable, the project file (corral.toml
in the current directory or the nearest parent), the user file ($XDG_CONFIG_HOME/corral/config.toml,
default ~/.config/corral/config.toml).
"""
SET_EPILOG = _KEYS + """
Examples:

  corral config set mau_declaration below-700m

  corral config set cache_dir /mnt/big/corral-cache --project    # ./corral.toml, for everyone in the repo
"""
GET_EPILOG = _KEYS + """
Examples:

  corral config get mau_declaration

  corral --json config get cache_dir | jq -r .value
"""
LIST_EPILOG = _KEYS + """
Examples:

  corral config list

  corral --json config list | jq '.settings[] | select(.key == "mau_declaration") | .origin'
"""
UNSET_EPILOG = _KEYS + """
Examples:

  corral config unset mau_declaration

  corral config unset cache_dir --project
"""

KeyArg = Annotated[str, typer.Argument(help="mau_declaration or cache_dir.", metavar="KEY", show_default=False,
                                       autocompletion=lambda incomplete: _complete_key(incomplete))]
ProjectOpt = Annotated[bool, typer.Option("--project", help="The project file (the nearest corral.toml, else "
                                          "./corral.toml) instead of the user file.")]


def _complete_key(incomplete: str) -> list[str]:
    from toolbox.settings import KEYS

    return [k for k in KEYS if k.startswith(incomplete)]


def _target(project: bool) -> Path:
    from toolbox.settings import PROJECT_FILE, project_file, user_file

    if not project:
        return user_file()
    return project_file() or Path.cwd() / PROJECT_FILE


def _write(path: Path, values: dict[str, str]) -> None:
    from toolbox.settings import dumps
    from toolbox.tensors.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(dumps(values), encoding="utf-8")


@app.command("set", epilog=SET_EPILOG)
def set_(ctx: typer.Context, key: KeyArg,
         value: Annotated[str, typer.Argument(help="The value.", metavar="VALUE", show_default=False)],
         project: ProjectOpt = False) -> None:
    """Store a setting in the user file (or the project's corral.toml)."""
    from toolbox.errors import UsageError
    from toolbox.settings import MAX_VALUE_CHARS, check_key, read_file

    check_key(key)
    if not value or len(value) > MAX_VALUE_CHARS or any(ord(c) < 32 for c in value):
        raise UsageError(f"{key}: give a value of 1 to {MAX_VALUE_CHARS} printable characters")
    if key == "mau_declaration":
        from license.stamp import parse_declaration

        value = parse_declaration(value)  # refused now (exit 5), not at the next write
    path = _target(project)
    values = {**read_file(path), key: value}
    _write(path, values)
    ctx.obj.result({"key": key, "value": value, "file": str(path)},
                   lambda c: c.print(f"{esc(key)} = {esc(value)} in {esc(path)}", highlight=False))


@app.command("get", epilog=GET_EPILOG)
def get(ctx: typer.Context, key: KeyArg) -> int:
    """Print a setting's effective value (exit 1 when it has none)."""
    from toolbox.settings import check_key, resolved

    check_key(key)
    setting = resolved().get(key)
    data = {"key": key, "value": setting.value if setting else None, "origin": setting.origin if setting else None}
    ctx.obj.result(data, lambda c: c.print(esc(setting.value) if setting else "", highlight=False))
    return 0 if setting else 1


@app.command("list", epilog=LIST_EPILOG)
def list_(ctx: typer.Context) -> None:
    """Every setting, its effective value and where it comes from."""
    from toolbox.settings import KEYS, resolved

    found = resolved()
    rows = [{"key": k, "value": found[k].value if k in found else None,
             "origin": found[k].origin if k in found else None, "env": spec.env} for k, spec in KEYS.items()]

    def render(c: Console) -> None:
        for r in rows:
            value = esc(r["value"]) if r["value"] is not None else "[dim](not set)[/dim]"
            origin = f"  [dim]# {esc(r['origin'])}[/dim]" if r["origin"] else ""
            c.print(f"{esc(r['key'])} = {value}{origin}", highlight=False)

    ctx.obj.result({"settings": rows}, render)


@app.command("unset", epilog=UNSET_EPILOG)
def unset(ctx: typer.Context, key: KeyArg, project: ProjectOpt = False) -> None:
    """Remove a setting from the user file (or the project's corral.toml)."""
    from toolbox.settings import check_key, read_file

    check_key(key)
    path = _target(project)
    values = read_file(path)
    removed = values.pop(key, None) is not None
    if removed:
        _write(path, values)
    ctx.obj.result({"key": key, "file": str(path), "removed": removed},
                   lambda c: c.print(f"{'removed' if removed else 'not set:'} {esc(key)} ({esc(path)})",
                                     highlight=False))
