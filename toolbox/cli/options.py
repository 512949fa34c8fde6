"""Shared option and argument types, so help text is identical in every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from toolbox.cli._typer import typer
from toolbox.cli.choices import BomFormat

CheckpointArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint: an HF directory (safetensors), a single .safetensors file, a .gguf file (any part of "
        "a split set), a corral ONNX export directory or .onnx file, or demo:scout / demo:maverick for the "
        "built-in tiny demo.",
        metavar="PATH",
        show_default=False,
    ),
]
OutputDirOpt = Annotated[
    Path,
    typer.Option("--output", "-o", help="Output directory (created atomically).", show_default=False),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing output (only once the new one is complete)."),
]
MauDeclarationOpt = Annotated[
    str | None,
    typer.Option("--mau-declaration", envvar="CORRAL_MAU_DECLARATION",
                 help="Your declaration about the Llama license's 700M monthly-active-user threshold: "
                 "below-700m, or meta-license:REFERENCE (kept with: corral config set mau_declaration ...).",
                 show_default=False),
]
FixNameOpt = Annotated[
    bool,
    typer.Option("--fix-name", help="Prefix the model name with 'Llama' when it does not begin with it."),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="Model name written into the output (must begin with 'Llama'; default: derived "
                 "from the input's name).", show_default=False),
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option("--base-model", help="Hub repo id of the base model, for the model card and GGUF "
                 "general.base_model.* (default: from a corral download manifest or the input's stamp).",
                 show_default=False),
]
BomOpt = Annotated[
    BomFormat | None,
    typer.Option("--bom", metavar="FORMAT", case_sensitive=False, show_default=False,
                 help="Also write a bill of materials of the finished output where corral bom, license check and "
                 "publish look: cyclonedx (DIR/bom.cdx.json, or FILE.cdx.json beside each .gguf file), spdx "
                 "(SPDX 2.3: bom.spdx.json, FILE.spdx.json) or spdx3 (SPDX 3.0.1, AI profile: bom.spdx3.json)."),
]
