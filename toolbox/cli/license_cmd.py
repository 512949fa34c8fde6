"""`corral license`: audit any artifact against its Llama license, and stamp an existing one.

Thin layers over `license.audit.check_artifact` and `license.retrofit.stamp_artifact`; heavy
imports (huggingface_hub, gguf, onnx) happen inside the commands, not at start-up.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.choices import CheckFormat, Policy, Relation
from toolbox.cli.options import BaseModelOpt, FixNameOpt, MauDeclarationOpt, NameOpt
from toolbox.cli.output import esc, plural

app = typer.Typer(help="Llama license obligations: audit artifacts, stamp them onto existing ones.",
                  no_args_is_help=True)

_ARTIFACTS = ("An HF checkpoint directory, a PEFT adapter directory, an ONNX model directory or .onnx file, "
              "a .gguf file (any part of a split set), or a directory of .gguf files")
CheckedArg = Annotated[str, typer.Argument(help=f"{_ARTIFACTS}; or demo:scout / demo:maverick.", metavar="PATH",
                                           show_default=False)]
StampedArg = Annotated[str, typer.Argument(help=f"{_ARTIFACTS}, stamped in place.", metavar="PATH",
                                           show_default=False)]
PolicyOpt = Annotated[Policy | None, typer.Option(
    "--policy", case_sensitive=False, help="License policy (default: recognised from the model; llama4 for "
    "Llama 4).", show_default=False)]

CHECK_EPILOG = """\
Checks the obligations of the Llama license that covers the model (recognised from its
architecture and tensor names, whatever its metadata says): NOTICE with the exact Notice
sentence, LICENSE and USE_POLICY.md byte-identical to the verbatim texts, a model name that
begins with "Llama", "Built with Llama" in the model card, a valid declaration about the 700M
monthly-active-user threshold, in-file metadata that agrees with the sidecar files, no other
license label, and the EU clause for multimodal models. A lone .gguf/.onnx file is judged on
its in-file metadata. A signature (model.sig, FILE.sig) or BOM (bom.cdx.json, bom.spdx.json,
FILE.cdx.json) beside it is read as data: a signed manifest or BOM that does not list exactly
the files (with --hashes: their sha256), or a BOM whose name, license or MAU declaration is not
the stamp's, is a warning (signature-inconsistent, bom-inconsistent); present and consistent is
a note. The signer is checked by corral verify --public-key, not here. Exit status: 0
compliant, 1 findings, 3 unreadable input.

Examples:

  corral license check ./Llama-4-Scout-17B-16E-Instruct-ft

  corral license check Llama-4-Scout-ft-Q8_0.gguf

  corral license check ./Llama-4-Scout-ft --format sarif > license.sarif

  corral --json license check ./adapter | jq '.findings[].code'

  corral license check ./Llama-4-Scout-signed --hashes
"""

STAMP_EPILOG = """\
Rewrites only metadata, in place: every safetensors header, the first file of a GGUF set, the
.onnx graph (never its external data), plus NOTICE, LICENSE, USE_POLICY.md and the README.md
model card for directories. All new files are complete before any replaces an original.
The name defaults to the one the artifact already carries (card, general.name) or its
directory/file name; it must begin with "Llama" (exit 5 otherwise; --fix-name prefixes it).
Replacing another license's label or a non-verbatim LICENSE needs --force.

Examples:

  corral license stamp ./my-scout-ft --mau-declaration below-700m --fix-name

  corral license stamp ./Llama-4-Scout-ft --base-model meta-llama/Llama-4-Scout-17B-16E-Instruct \\
      --relation finetune --mau-declaration below-700m

  CORRAL_MAU_DECLARATION=meta-license:ACME-2025-17 corral license stamp Llama-4-Scout-Q8_0.gguf

  corral license stamp ./onnx-export --name Llama-4-Scout-onnx --mau-declaration below-700m
"""

_STYLE = {"error": "red", "warning": "yellow"}


@app.command("check", epilog=CHECK_EPILOG)
def check(
    ctx: typer.Context,
    path: CheckedArg,
    fmt: Annotated[CheckFormat | None, typer.Option(
        "--format", case_sensitive=False, show_default=False,
        help="Output: text (default), json (as the global --json) or sarif (SARIF 2.1.0 for code scanning; "
        "not with --json).")] = None,
    policy: PolicyOpt = None,
    hashes: Annotated[bool, typer.Option("--hashes", help="Also compare every file's sha256 with the signature's "
                                         "manifest and the BOM (reads every byte).")] = False,
) -> int:
    """Audit an artifact against the obligations of its Llama license."""
    from license.audit import check_artifact
    from toolbox.errors import UsageError

    out = ctx.obj
    if out.json_mode and fmt not in (None, "json"):
        raise UsageError(f"--json and --format {fmt} exclude each other", hint="give one of them")
    fmt = fmt or ("json" if out.json_mode else "text")
    if path.startswith("demo:"):
        from toolbox.reference import resolve_path

        path = str(resolve_path(path))
    report = check_artifact(path, policy_id=policy, hashes=hashes)
    if fmt == "sarif":
        from license.sarif import to_sarif

        sys.stdout.write(json.dumps(to_sarif(report), indent=2) + "\n")
    elif fmt == "json" and not out.json_mode:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out.result(report.to_dict(), lambda console: _render(console, report))
    return int(report.exit_code)


def _render(console: Console, report: object) -> None:
    from license.audit import AuditReport

    assert isinstance(report, AuditReport)
    for f in report.findings:
        style = _STYLE[f.severity]
        console.print(f"[{style}]{f.severity:7}[/{style}] {esc(f.code):22} [dim]§{esc(f.clause)}[/dim] {esc(f.path)}: "
                      f"{esc(f.message)}",
                      highlight=False)
        console.print(f"{'':8}[dim]fix:[/dim] {esc(f.fix)}", highlight=False)
    for note in report.notes:
        console.print(f"[dim]note    {esc(note)}[/dim]", highlight=False)
    if report.policy is None:
        console.print(f"[green]OK[/green] {esc(report.path)}: not a Llama-licensed model", highlight=False)
        return
    verdict = "[green]COMPLIANT[/green]" if report.ok else f"[red]{len(report.findings)} FINDINGS[/red]"
    mm = ", multimodal" if report.multimodal else ""
    console.print(f"{verdict} {esc(report.path)} ({esc(report.kind)}{mm}, policy {esc(report.policy)})",
                  highlight=False)


@app.command("stamp", epilog=STAMP_EPILOG)
def stamp(
    ctx: typer.Context,
    path: StampedArg,
    mau_declaration: MauDeclarationOpt = None,
    name: NameOpt = None,
    fix_name: FixNameOpt = False,
    base_model: BaseModelOpt = None,
    base_revision: Annotated[str | None, typer.Option("--base-revision", help="Revision (commit) of the base "
                                                      "model.", show_default=False)] = None,
    relation: Annotated[Relation | None, typer.Option("--relation", case_sensitive=False, show_default=False,
                                                      help="How it derives from the base model.")] = None,
    policy: PolicyOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace another license's label or a LICENSE that is "
                                        "not the verbatim text.")] = False,
) -> None:
    """Stamp the license obligations onto an existing artifact, in place."""
    from license.retrofit import describe, stamp_artifact
    from license.stamp import Stamp

    out = ctx.obj
    facts = describe(path)
    policy_id = policy or facts.policy_id or "llama4"
    s = Stamp.create(
        name or facts.name, declaration=mau_declaration, fix=fix_name, policy_id=policy_id,
        base_model=base_model or facts.base_model,
        base_revision=base_revision or (facts.base_revision if not base_model else None),
        relation=relation or facts.relation, multimodal=facts.multimodal,
        provenance={"operations": [{"op": "license.stamp", "policy": policy_id}]})
    if name is None and not fix_name:
        out.debug(f"name {s.name!r} taken from the {facts.name_source}")
    result = stamp_artifact(path, s, force=force)
    data = {**result.to_dict(), "policy": s.policy_id, "declaration": str(s.declaration), "multimodal": s.multimodal}

    def render(console: Console) -> None:
        for p in result.written:
            console.print(f"[green]stamped[/green] {esc(p)}", highlight=False)
        console.print(f"{esc(result.path)}: {esc(s.name)} under the {esc(s.policy.display_name)}; "
                      f"{plural(len(result.written), 'file')} written, {len(result.unchanged)} already right",
                      highlight=False)

    out.result(data, render)
