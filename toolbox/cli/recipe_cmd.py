"""`corral recipe`: run, validate, list, show and describe (JSON Schema) recipe pipelines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.choices import complete_recipe
from toolbox.cli.options import MauDeclarationOpt
from toolbox.cli.output import esc

app = typer.Typer(help="Declarative, reproducible pipelines for CI: source -> merge/prune/convert -> gates -> "
                  "outputs.", no_args_is_help=True)

RecipeArg = Annotated[str, typer.Argument(help="A recipe file (.yaml) or the name of a built-in recipe "
                                          "(corral recipe list).", metavar="RECIPE", show_default=False,
                                          autocompletion=complete_recipe)]

RUN_EPILOG = """\
Each step is keyed by its operation, parameters and the content of its inputs; built steps are
kept in the recipe cache ($CORRAL_CACHE_DIR/recipes, or --cache-dir), so a re-run does no work
and a changed quant list builds only the new quantizations (in CI, persist the cache directory).
Outputs are published into --output (default ./RECIPE-NAME) as read-only hard links to the cache,
with corral-recipe.json listing every file's sha256; outputs an earlier run published there
(listed in its corral-recipe.json) that the recipe no longer produces are removed, so the
directory holds exactly the recipe's outputs (other files are never touched). An output name
may use {model}: the source's model name (Llama-4-Scout-demo for demo:scout). --lock FILE pins the Hub commit and input
hashes on the first run and, on later runs, refuses changed inputs and checks that rebuilt
outputs are byte-identical. --executor ray runs every step as a task on a Ray cluster (the parts of a
split GGUF as one task each); the cache, the source and the output directory must then be on storage
every node sees under the same path, with the same corral installed on every node ('corral[ray]').
Exit status: 0 ok, 1 a gate (verify, license-check) failed, 2 usage (ray not installed), 3 invalid
recipe or input, 4 Hub access or a cluster that cannot run or lost a step, 5 license policy.

Examples:

  corral recipe run scout-gguf --set source=demo:scout --mau-declaration below-700m

  corral recipe run ./my-recipe.yaml --dry-run

  corral recipe run ./my-recipe.yaml --lock my-recipe.lock --accept-license -o ./artifacts

  corral recipe run scout-gguf --set 'steps.gguf.matrix.quant=[q8_0, q5_k_m, q4_k_m]'

  corral recipe run scout-gguf --executor ray --address auto --cache-dir /shared/corral -o /shared/out
"""

VALIDATE_EPILOG = """\
Exit status: 0 valid, 3 invalid (the message names the file, line and field).

Examples:

  corral recipe validate my-recipe.yaml --set source=demo:scout

  corral --json recipe validate my-recipe.yaml | jq .steps
"""

LIST_EPILOG = """\
Examples:

  corral recipe list

  corral --json recipe list | jq -r '.recipes[].name'
"""

SHOW_EPILOG = """\
Examples:

  corral recipe show scout-gguf > my-recipe.yaml

  corral --json recipe show scout-gguf | jq -r .path
"""

SCHEMA_EPILOG = """\
Examples:

  corral recipe schema > corral-recipe.schema.json

  # yaml-language-server: $schema=./corral-recipe.schema.json   (first line of a recipe, for editors)
"""


@app.command("run", epilog=RUN_EPILOG)
def run(
    ctx: typer.Context,
    recipe: RecipeArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", show_default=False,
                                                help="Where outputs are published (default: ./RECIPE-NAME).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                                                   help="Override a recipe field (repeatable): source=demo:scout, "
                                                   "steps.ID.with.outtype=q8_0, steps.ID.matrix.quant=[a, b].")
                    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (steps, cached or to build, "
                                          "outputs, estimated disk use); build nothing.")] = False,
    lock: Annotated[Path | None, typer.Option("--lock", metavar="FILE", show_default=False,
                                              help="Lock file: written on first use, enforced afterwards.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, show_default=False,
                                             help="Independent steps run in parallel (default: from cores and "
                                             "memory).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", show_default=False,
                                                   help="Step cache (default: $CORRAL_CACHE_DIR/recipes).")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license", help="Accept the Llama license of a Hub "
                                                 "source (as corral download --accept-license).")] = False,
    mau_declaration: MauDeclarationOpt = None,
    executor: Annotated[str | None, typer.Option("--executor", metavar="local|ray", show_default=False,
                                                 help="Where steps run: threads here (local, the default) or "
                                                 "tasks on a Ray cluster (ray); else $CORRAL_EXECUTOR, else "
                                                 "the recipe's executor:.")] = None,
    address: Annotated[str | None, typer.Option("--address", metavar="auto|HOST:PORT|ray://HOST:PORT",
                                                show_default=False,
                                                help="The Ray cluster (--executor ray; default $RAY_ADDRESS, "
                                                "else a new Ray instance on this machine).")] = None,
) -> int:
    """Run a recipe: build what is not cached, check the gates, publish the outputs."""
    from toolbox.recipe import load_recipe, run_recipe

    out = ctx.obj
    loaded = load_recipe(recipe, set_ or [])
    result = run_recipe(loaded, output, cache_dir=cache_dir, dry_run=dry_run, lock=lock, jobs=jobs,
                        accept_license=accept_license, mau_declaration=mau_declaration, executor=executor,
                        address=address, progress=out.progress())

    def render(console: Console) -> None:
        from toolbox.cli.output import human_size

        head = "plan" if result.dry_run else "ran"
        console.print(f"[bold]{head}[/bold] {esc(result.name)} ({esc(result.recipe)}) -> {esc(result.output_dir)}",
                      highlight=False)
        style = {"cached": "dim", "built": "green", "planned": "cyan", "failed": "red", "skipped": "yellow"}
        for inst in result.instances:
            st = style.get(inst.status, "")
            extra = f" -> {esc(inst.output)}" if inst.output else ""
            size = f" ~{human_size(inst.estimate)}" if result.dry_run and inst.status == "planned" and inst.estimate \
                else ""
            took = f" {inst.seconds:.1f}s{_where(inst.built_by)}" if inst.status == "built" else ""
            console.print(f"  [{st}]{inst.status:8}[/{st}] {esc(inst.label)} ({esc(inst.step.uses)}){extra}{size}"
                          f"{took}",
                          highlight=False)
        if result.dry_run:
            total = sum(i.estimate for i in result.instances if i.status == "planned")
            console.print(f"{sum(1 for i in result.instances if i.status == 'planned')} steps to build, estimated "
                          f"disk use {human_size(total)} (upper bound) in {esc(result.cache_dir)}", highlight=False)
        else:
            for gone in (p for p in result.published if p["status"] == "removed"):
                console.print(f"  [yellow]removed[/yellow]  {esc(gone['path'])} (published by an earlier run, no "
                              "longer an output)", highlight=False)
            kept = sum(1 for p in result.published if p["status"] != "removed")
            console.print(f"[green]OK[/green] built {result.work_done}, cached "
                          f"{sum(1 for i in result.instances if i.status == 'cached')}; "
                          f"{kept} outputs in {esc(result.output_dir)}", highlight=False)

    out.result(result.to_dict(), render)
    return 0


def _where(built_by: dict | None) -> str:
    """' on HOST (node_b)' for a step a Ray task built, '' for a local one."""
    if not built_by or built_by.get("executor") != "ray":
        return ""
    nodes = built_by.get("parts") or [built_by]
    names = sorted({f"{n.get('hostname')}" + (f" ({','.join(n['resources'])})" if n.get("resources") else "")
                    for n in nodes})
    return " on " + esc(", ".join(names))


@app.command("validate", epilog=VALIDATE_EPILOG)
def validate(
    ctx: typer.Context,
    recipe: RecipeArg,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                                                   help="Apply overrides before validating (repeatable).")] = None,
) -> int:
    """Check a recipe against the schema; errors point at the YAML line and field."""
    from toolbox.recipe import load_recipe
    from toolbox.recipe.run import expand

    loaded = load_recipe(recipe, set_ or [])
    steps = expand(loaded)
    ctx.obj.result({"recipe": loaded.recipe.name, "file": str(loaded.path), "valid": True,
                    "steps": [i.label for i in steps]},
                   lambda c: c.print(f"[green]valid[/green] {esc(loaded.path)}: {esc(loaded.recipe.name)}, "
                                     f"{len(loaded.recipe.steps)} steps ({len(steps)} with the matrix)",
                                     highlight=False))
    return 0


@app.command("list", epilog=LIST_EPILOG)
def list_(ctx: typer.Context) -> int:
    """The built-in recipes."""
    from toolbox.recipe import builtin_recipes, load_recipe

    items = []
    for name, path in builtin_recipes().items():
        r = load_recipe(path).recipe
        items.append({"name": name, "description": r.description, "source": r.source, "path": str(path)})

    def render(console: Console) -> None:
        for it in items:
            console.print(f"[bold]{esc(it['name']):22}[/bold] {esc(it['description'])}", highlight=False)

    ctx.obj.result({"recipes": items}, render)
    return 0


@app.command("show", epilog=SHOW_EPILOG)
def show(ctx: typer.Context, recipe: RecipeArg) -> int:
    """Print a recipe's YAML (a starting point for your own); with --json, a document holding it."""
    from toolbox.recipe.load import find_recipe

    path = find_recipe(recipe)
    text = path.read_text(encoding="utf-8")
    if ctx.obj.json_mode:
        ctx.obj.result({"recipe": recipe, "path": str(path), "yaml": text})
    else:
        sys.stdout.write(text)
    return 0


@app.command("schema", epilog=SCHEMA_EPILOG)
def schema() -> int:
    """Print the JSON Schema of recipe files (for editors and linters)."""
    from toolbox.recipe import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0
