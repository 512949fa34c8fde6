"""`corral convert`: between HF safetensors and GGUF (ONNX to come)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from toolbox.cli._typer import typer
from toolbox.cli.options import FixNameOpt, ForceOpt, MauDeclarationOpt

EPILOG = """\
Every output carries the Llama 4 license stamp: its name must begin with "Llama" and you
must declare where you stand on the license's 700M monthly-active-user threshold
(--mau-declaration below-700m, or meta-license:REFERENCE; or CORRAL_MAU_DECLARATION).

Examples:

  corral convert demo:scout --to gguf -o llama-4-scout-demo.gguf --mau-declaration below-700m

  export CORRAL_MAU_DECLARATION=below-700m

  corral convert ./Llama-4-Scout-17B-16E-Instruct --to gguf --outtype q8_0 -o scout-q8_0.gguf --split-max-size 50G

  corral convert scout-bf16.gguf --to hf -o ./Llama-4-Scout-from-gguf --mau-declaration below-700m

Output types computed here: auto (the source's float type), f32, f16, bf16, q8_0, q4_0,
q4_1, q5_0, q5_1, tq1_0, tq2_0, mxfp4. Norms and the router stay F32.
"""


def convert(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory, demo:scout|demo:maverick, or a .gguf file.",
                                       metavar="SRC", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Target format: gguf or hf.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.gguf) or directory (hf).",
                                         show_default=False)],
    outtype: Annotated[str, typer.Option("--outtype", help="GGUF tensor type (see below).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="HF output dtype: auto, bf16, f16, f32.")] = "auto",
    split_max_size: Annotated[str, typer.Option("--split-max-size", help="Split GGUF files above this size, "
                                                "e.g. 50G (0: one file).")] = "0",
    name: Annotated[str | None, typer.Option("--name", help="Model name written into the output "
                                             "(must begin with 'Llama').")] = None,
    allow_lossy_config: Annotated[bool, typer.Option("--allow-lossy-config", help="Convert configs llama.cpp "
                                                     "cannot represent, with a warning.")] = False,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub repo id of the base model, "
                                                   "for the model card and GGUF general.base_model.*")] = None,
    force: ForceOpt = False,
) -> None:
    """Convert a Llama 4 checkpoint between formats, streaming one tensor slice at a time."""
    from converters.registry import detect_format
    from toolbox.errors import UsageError
    from toolbox.tensors.sink import parse_size

    out = ctx.obj
    source_format = detect_format(src)
    target = to.lower()
    if (source_format, target) == ("hf", "gguf"):
        from converters.hf_to_gguf import convert_hf_to_gguf

        try:
            max_size = parse_size(split_max_size)
        except ValueError:
            raise UsageError(f"--split-max-size {split_max_size!r} is not a size", hint="e.g. 50G or 500M") from None
        result = convert_hf_to_gguf(src, output, outtype=outtype, split_max_size=max_size, name=name,
                                    mau_declaration=mau_declaration, fix_name=fix_name, base_model=base_model,
                                    allow_lossy_config=allow_lossy_config, force=force, progress=out.progress())
        for w in result.warnings:
            out.warn(w)
        data = {"source": src, "format": "gguf", "outtype": result.outtype, "tensors": result.tensors,
                "bytes": result.bytes, "paths": [str(p) for p in result.paths]}
        out.result(data, lambda c: c.print(f"wrote {', '.join(map(str, result.paths))} ({result.outtype}, "
                                           f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB)"))
        return
    if (source_format, target) == ("gguf", "hf"):
        from converters.gguf_to_hf import convert_gguf_to_hf

        res = convert_gguf_to_hf(src, output, dtype=dtype, name=name, mau_declaration=mau_declaration,
                                 fix_name=fix_name, force=force, progress=out.progress())
        out.result({"source": src, "format": "hf", "path": str(res.path), "tensors": res.tensors,
                    "dtype": res.dtype}, lambda c: c.print(f"wrote {res.path} ({res.tensors} tensors, {res.dtype})"))
        return
    from converters.registry import converter_for

    converter_for(source_format, target)  # raises the usage error naming the supported pairs
    raise UsageError(f"cannot convert {source_format} to {target} yet")
