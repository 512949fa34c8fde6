"""`corral bom`: a CycloneDX 1.6 ML-BOM or SPDX 2.3 document of a stamped artifact (files, hashes, lineage,
license)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.choices import BomFormat
from toolbox.cli.options import ForceOpt
from toolbox.cli.output import esc, plural

EPILOG = """\
The BOM describes the model as a CycloneDX machine-learning-model component: every file
with its SHA-256, the lineage from the stamp corral wrote into the files (base model repo
and revision as a pkg:huggingface purl, merged adapters with their hashes, each operation
with its parameters), the license as LicenseRef-llama4 with the agreement text, the MAU
declaration and the other license duties. It is checked against the CycloneDX 1.6 JSON
schema by cyclonedx-python-lib's own validator before it is written (atomically). The
artifact must carry a corral stamp (corral license stamp). Git metadata, model.sig and
BOMs (bom.cdx.json, bom.spdx.json) are not listed. --format spdx writes SPDX 2.3 JSON
(the model a package containing each file with SHA-1 and SHA-256, DESCENDANT_OF its base
model and adapters, LicenseRef-llama4 with the text), validated by spdx-tools. Inside a
directory the conventional names are bom.cdx.json / bom.spdx.json, which corral publish
and corral license check look for. SPDX 3.0 (AI profile) is not offered yet.

Exit status: 0 written, 2 usage error (output exists without --force), 3 unreadable or
unstamped artifact.

Examples:

  corral bom ./Llama-4-Scout-merged -o scout-merged.cdx.json

  corral bom scout-q8_0.gguf --format cyclonedx -o scout-q8_0.gguf.cdx.json --force

  corral bom ./Llama-4-Scout-merged --format spdx -o ./Llama-4-Scout-merged/bom.spdx.json
"""


def bom(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="A stamped artifact: a model directory (HF, ONNX, adapter, GGUF set) "
                                        "or a lone .gguf/.onnx/.safetensors file.", metavar="PATH",
                                        show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", show_default=False,
                                         help="Where to write the BOM (JSON, written atomically).")],
    fmt: Annotated[BomFormat, typer.Option("--format", help="BOM standard: cyclonedx (CycloneDX 1.6 JSON) or spdx "
                                           "(SPDX 2.3 JSON).")]
    = "cyclonedx",
    force: ForceOpt = False,
) -> int:
    """Write a CycloneDX 1.6 ML-BOM (or SPDX 2.3) of an artifact: files and hashes, lineage, license."""
    from toolbox.cli.deps import require

    require("spdx_tools" if fmt == "spdx" else "cyclonedx")
    from toolbox.supply.bom import build_bom

    out = ctx.obj
    result = build_bom(path, output, fmt=fmt, force=force, progress=out.progress())

    def render(console: Console) -> None:
        kind = "SPDX 2.3 document" if fmt == "spdx" else "CycloneDX 1.6 ML-BOM"
        console.print(f"{esc(result.output)}: {kind} of {esc(result.model)} "
                      f"({plural(len(result.files), 'file')})", highlight=False)

    out.result(result.to_dict(), render)
    return 0
