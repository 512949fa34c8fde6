"""`corral license`: audit any artifact, and stamp the obligations onto an existing one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from toolbox.cli._typer import typer
from toolbox.cli.options import FixNameOpt, MauDeclarationOpt

app = typer.Typer(help="Llama license obligations: audit artifacts, stamp outputs.", no_args_is_help=True)

CHECK_EPILOG = """\
Checks: NOTICE (exact sentence), LICENSE and USE_POLICY.md (byte-identical), a model name
beginning with "Llama", "Built with Llama" in the card, the 700M MAU declaration, in-file
metadata agreeing with the sidecars, relabelling of a Llama 4 model, the EU clause for
multimodal models. Exit 0 compliant, 1 findings.

Examples:

  corral license check ./Llama-4-Scout-ft

  corral license check scout-q8_0.gguf --format sarif > corral.sarif
"""

STAMP_EPILOG = """\
Examples:

  corral license stamp ./my-merge --name Llama-4-Scout-my-merge --mau-declaration below-700m

  corral license stamp model.gguf --fix-name --mau-declaration meta-license:ACME-2025-001
"""


@app.command("check", epilog=CHECK_EPILOG)
def check(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="HF or adapter directory, or a .gguf file.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif.")] = "text",
) -> int:
    """Audit an artifact against the Llama 4 license obligations."""
    from license.audit import check_artifact
    from toolbox.errors import UsageError

    out = ctx.obj
    if fmt not in ("text", "json", "sarif"):
        raise UsageError(f"unknown --format {fmt!r}", hint="text, json or sarif")
    report = check_artifact(path)
    if fmt == "sarif":
        sys.stdout.write(json.dumps(report.to_sarif(), indent=2) + "\n")
        return int(report.exit_code)
    if fmt == "json":
        out.json_mode = True

    def render(console: object) -> None:
        for f in report.findings:
            out.out.print(f"[red]{f.code:32}[/red] [{f.clause}] {f.message}\n{'':33}fix: {f.fix}", highlight=False)
        if not report.is_llama:
            out.out.print(f"{report.path}: not recognised as a Llama model; nothing to check")
        else:
            verdict = "[green]compliant[/green]" if report.ok else f"[red]{len(report.findings)} finding(s)[/red]"
            out.out.print(f"{verdict}: {report.path} ({report.format})", highlight=False)

    out.result(report.to_dict(), render)
    return int(report.exit_code)


@app.command("stamp", epilog=STAMP_EPILOG)
def stamp(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="HF or adapter directory, or a .gguf file.", show_default=False)],
    name: Annotated[str | None, typer.Option("--name", help="Model name (must begin with 'Llama'); default: the "
                                             "existing one or the directory/file name.")] = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub repo id of the base model.")] = None,
    relation: Annotated[str | None, typer.Option("--relation", help="finetune, quantized, merge or adapter.")]
    = None,
) -> None:
    """Retrofit the license stamp onto an existing artifact, in place and atomically."""
    from license.retrofit import stamp_artifact
    from license.stamp import Stamp
    from toolbox.errors import BadInputError

    out = ctx.obj
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory", path=path)
    multimodal = False
    cfg = path / "config.json"
    if cfg.is_file():
        multimodal = "Llama4ForConditionalGeneration" in (json.loads(cfg.read_text()).get("architectures") or [])
    stamp_ = Stamp.create(name or path.stem, declaration=mau_declaration, fix=fix_name, base_model=base_model,
                          relation=relation, multimodal=multimodal,
                          provenance={"operations": [{"op": "license-stamp"}]})
    written = stamp_artifact(path, stamp_)
    out.result({"path": str(path), "name": stamp_.name, "written": [str(p) for p in written]},
               lambda c: c.print(f"stamped {path} as {stamp_.name} ({len(written)} files)"))
