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
ShardSizeOpt = Annotated[
    str | None,
    typer.Option("--shard-size", metavar="SIZE", show_default=False,
                 help="Largest safetensors file of the HF output, e.g. 2G, 500M or 2GiB (at least 1 MB; default "
                 "5GiB); the files are model-0000i-of-0000n.safetensors + index. Not with --to gguf (a GGUF is "
                 "split by corral convert --split-max-size)."),
]


def shard_bytes(size: str | None, to: str = "hf") -> int | None:
    """--shard-size as bytes (None: the writer's default), parsed as a recipe's `shard_size`; UsageError (exit 2)
    for 0, a size below 1 MB, or a GGUF output."""
    from toolbox.errors import InvalidSizeError, UsageError
    from toolbox.tensors.sink import MIN_SPLIT_BYTES, parse_size

    if size is None:
        return None
    if to != "hf":
        raise UsageError("--shard-size sizes the safetensors files of an HF output (--to hf)",
                         hint="write the HF output, then corral convert --to gguf --split-max-size SIZE")
    hint = "write e.g. 2G, 500M or 2GiB (at least 1,000,000 bytes), or leave it out for 5GiB"
    try:
        value = parse_size(size, minimum=MIN_SPLIT_BYTES)
    except InvalidSizeError as exc:
        raise InvalidSizeError(f"--shard-size {exc.message}", hint=hint) from None
    if value == 0:
        raise InvalidSizeError("--shard-size 0 is not a size", hint=hint)
    return value
