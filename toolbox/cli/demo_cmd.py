"""`corral demo`: the built-in tiny Llama 4 checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from toolbox.cli._typer import typer
from toolbox.cli.choices import Variant
from toolbox.cli.options import ForceOpt

app = typer.Typer(help="Tiny random Llama 4 checkpoints with the real tokenizer (no Hub, no token).",
                  no_args_is_help=True)

EPILOG = """\
Examples:

  corral demo create ./tiny-scout

  corral demo create ./tiny-maverick --variant maverick --force

Anywhere a checkpoint path is accepted, demo:scout and demo:maverick name cached copies.
"""


@app.command("create", epilog=EPILOG)
def create(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Argument(help="Directory to create.", metavar="OUT", show_default=False)],
    variant: Annotated[Variant, typer.Option("--variant", case_sensitive=False,
                                             help="scout (16 experts) or maverick (128 experts).")] = "scout",
    force: ForceOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny demo checkpoint (real Llama 4 structure and tokenizer, random weights)."""
    from toolbox.demo import create_demo

    out = ctx.obj
    path = create_demo(out_dir, variant, force=force, seed=seed, progress=out.progress())
    out.result({"path": str(path), "variant": variant, "seed": seed},
               lambda c: c.print(f"wrote demo:{variant} checkpoint to {path}", markup=False))
