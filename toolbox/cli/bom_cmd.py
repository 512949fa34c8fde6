"""`corral bom`: a CycloneDX 1.6 ML-BOM or SPDX 2.3 document of a stamped artifact (files, hashes, lineage,
license)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

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
BOMs (bom.cdx.json, bom.spdx.json, bom.spdx3.json) are not listed. --format spdx writes SPDX 2.3 JSON
(the model a package containing each file with SHA-1 and SHA-256, DESCENDANT_OF its base
model and adapters, LicenseRef-llama4 with the text), validated by spdx-tools. Inside a
directory the conventional names are bom.cdx.json / bom.spdx.json, which corral publish
and corral license check look for. --format spdx3 writes SPDX 3.0.1 JSON-LD with the AI
profile (spdx-python-model): the model an ai_AIPackage containing each file (SHA-256),
declaring LicenseRef-llama4 with the text, descendantOf its base model and adapters, one
build per operation; read back by the library's deserializer before it is written
(bom.spdx3.json / FILE.spdx3.json).

Exit status: 0 written, 2 usage error (output exists without --force), 3 unreadable or
unstamped artifact.

Examples:

  corral bom ./Llama-4-Scout-merged -o scout-merged.cdx.json

  corral bom scout-q8_0.gguf --format cyclonedx -o scout-q8_0.gguf.cdx.json --force

  corral bom ./Llama-4-Scout-merged --format spdx -o ./Llama-4-Scout-merged/bom.spdx.json

  corral bom ./Llama-4-Scout-merged --format spdx3 -o ./Llama-4-Scout-merged/bom.spdx3.json
"""


def bom(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="A stamped artifact: a model directory (HF, ONNX, adapter, GGUF set) "
                                        "or a lone .gguf/.onnx/.safetensors file.", metavar="PATH",
                                        show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", show_default=False,
                                         help="Where to write the BOM (JSON, written atomically).")],
    fmt: Annotated[BomFormat, typer.Option("--format", help="BOM standard: cyclonedx (CycloneDX 1.6 JSON), spdx "
                                           "(SPDX 2.3 JSON) or spdx3 (SPDX 3.0.1 JSON-LD, AI profile).")]
    = "cyclonedx",
    force: ForceOpt = False,
) -> int:
    """Write a CycloneDX 1.6 ML-BOM (or SPDX 2.3 / 3.0.1) of an artifact: files and hashes, lineage, license."""
    from toolbox.cli.deps import require

    require(LIBRARY[fmt])
    from toolbox.supply.bom import build_bom

    out = ctx.obj
    result = build_bom(path, output, fmt=fmt, force=force, progress=out.progress())

    def render(console: Console) -> None:
        console.print(f"{esc(result.output)}: {KIND[fmt]} of {esc(result.model)} "
                      f"({plural(len(result.files), 'file')})", highlight=False)

    out.result(result.to_dict(), render)
    return 0


LIBRARY = {"cyclonedx": "cyclonedx", "spdx": "spdx_tools", "spdx3": "spdx_python_model"}  # what each format imports
KIND = {"cyclonedx": "CycloneDX 1.6 ML-BOM", "spdx": "SPDX 2.3 document", "spdx3": "SPDX 3.0.1 document (AI profile)"}


def need_bom(fmt: str | None) -> None:
    """`--bom FORMAT` of another command: its library is checked before that command's work starts."""
    if fmt is not None:
        from toolbox.cli.deps import require

        require(LIBRARY[fmt])


def with_boms(out: Any, artifacts: Sequence[str | Path], fmt: str | None, data: dict[str, Any],
              render: Callable[[Console], None]) -> tuple[dict[str, Any], Callable[[Console], None]]:
    """After another command finished its output: the BOM beside each artifact (`toolbox.supply.bom.write_beside`),
    the result document with a `boms` list, and a rendering that names them after the command's own."""
    if fmt is None:
        return data, render
    from toolbox.supply.bom import write_beside

    results = write_beside(artifacts, fmt, progress=out.progress())

    def both(console: Console) -> None:
        render(console)
        for r in results:
            console.print(f"{esc(r.output)}: {KIND[fmt]} of {esc(r.model)} ({plural(len(r.files), 'file')})",
                          highlight=False)

    return {**data, "boms": [r.to_dict() for r in results]}, both
