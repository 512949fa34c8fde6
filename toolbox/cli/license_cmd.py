"""`corral license`: placeholder until the compliance layer lands."""

from __future__ import annotations

from toolbox.cli._typer import typer

app = typer.Typer(help="Llama license obligations: stamp outputs and audit artifacts.", no_args_is_help=True)
