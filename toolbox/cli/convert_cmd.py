"""`corral convert`: between HF safetensors, GGUF and ONNX."""

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

  corral convert demo:scout --to gguf -o scout.gguf --mmproj auto    # + scout.mmproj.gguf

  corral convert scout.gguf --to hf --mmproj scout.mmproj.gguf -o ./Llama-4-Scout-multimodal

  corral convert demo:scout --to onnx -o ./Llama-4-Scout-demo-onnx --mau-declaration below-700m

  corral convert ./Llama-4-Scout-demo-onnx --to hf -o ./Llama-4-Scout-from-onnx --mau-declaration below-700m

Vision: --mmproj auto also writes OUT.mmproj.gguf (vision tower + projector) for llama.cpp's
multimodal runtime; --to hf --mmproj FILE merges it back into a full multimodal checkpoint.

Output types computed here: auto (the source's float type), f32, f16, bf16, q8_0, q4_0,
q4_1, q5_0, q5_1, tq1_0, tq2_0, mxfp4. Norms and the router stay F32.

ONNX (--to onnx): the text model with KV cache (input_ids, attention_mask, position_ids,
past_key_values.N.key/value -> logits, present.N.key/value), routed experts computed sparsely,
weights streamed into model.onnx.data; --dtype fp32 (default for auto), fp16 or bf16. The vision
encoder is not exported (--vision is refused).
"""


def convert(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory, demo:scout|demo:maverick, a .gguf file, "
                                       "or a corral ONNX export directory.",
                                       metavar="SRC", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Target format: gguf, hf or onnx.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.gguf) or directory (hf, onnx).",
                                         show_default=False)],
    outtype: Annotated[str, typer.Option("--outtype", help="GGUF tensor type (see below).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="HF output dtype: auto, bf16, f16, f32 (ONNX: fp32, fp16, "
                                       "bf16; auto = fp32).")] = "auto",
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
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (18-23; default 18).",
                                              show_default=False)] = None,
    no_kv_cache: Annotated[bool, typer.Option("--no-kv-cache", help="ONNX without past/present KV inputs and "
                                              "outputs.")] = False,
    vision: Annotated[bool, typer.Option("--vision", help="Also export the vision encoder (ONNX: not supported "
                                         "yet; refused).")] = False,
    mmproj: Annotated[str | None, typer.Option(
        "--mmproj", metavar="auto|none|FILE", show_default=False,
        help="--to gguf: 'auto' also writes the vision tower + projector as OUT.mmproj.gguf for llama.cpp's "
        "multimodal runtime. --to hf from GGUF: the mmproj FILE to merge back (a full multimodal model).")] = None,
    mmproj_outtype: Annotated[str | None, typer.Option(
        "--mmproj-outtype", show_default=False,
        help="mmproj tensor type: f32, f16, bf16, q8_0 (default: the text type where it fits, else f16).")] = None,
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
        want_mmproj = (mmproj or "none").lower()
        if want_mmproj not in ("auto", "none"):
            raise UsageError(f"--mmproj {mmproj!r}: with --to gguf use --mmproj auto (or none)",
                             hint="the mmproj file is written beside the output as OUT.mmproj.gguf")
        mm_path = None
        if want_mmproj == "auto":
            from converters.gguf_mmproj import mmproj_outtype_for, mmproj_path_for, preflight
            from toolbox.tensors.atomic import check_output_path

            mm_path = mmproj_path_for(output)
            check_output_path(Path(output).absolute(), force=force)  # both refused before any work
            check_output_path(mm_path.absolute(), force=force)
            preflight(src, mmproj_outtype or mmproj_outtype_for(outtype), allow_lossy_config=allow_lossy_config)
        result = convert_hf_to_gguf(src, output, outtype=outtype, split_max_size=max_size, name=name,
                                    mau_declaration=mau_declaration, fix_name=fix_name, base_model=base_model,
                                    allow_lossy_config=allow_lossy_config, force=force,
                                    multimodal=mm_path is not None, progress=out.progress())
        for w in result.warnings:
            out.warn(w)
        data = {"source": src, "format": "gguf", "outtype": result.outtype, "tensors": result.tensors,
                "bytes": result.bytes, "paths": [str(p) for p in result.paths]}
        if mm_path is not None:
            from converters.gguf_mmproj import convert_hf_to_mmproj, mmproj_outtype_for

            mm = convert_hf_to_mmproj(src, mm_path, outtype=mmproj_outtype or mmproj_outtype_for(outtype),
                                      name=result.name, mau_declaration=mau_declaration, fix_name=fix_name,
                                      base_model=base_model, allow_lossy_config=allow_lossy_config, force=force,
                                      progress=out.progress())
            for w in mm.warnings:
                out.warn(w)
            data["mmproj"] = {"path": str(mm.paths[0]), "outtype": mm.outtype, "tensors": mm.tensors,
                              "bytes": mm.bytes}
        written = [*result.paths, *([Path(data["mmproj"]["path"])] if mm_path is not None else [])]
        out.result(data, lambda c: c.print(f"wrote {', '.join(map(str, written))} ({result.outtype}, "
                                           f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB)"))
        return
    if (source_format, target) == ("gguf", "hf"):
        from converters.gguf_to_hf import convert_gguf_to_hf

        res = convert_gguf_to_hf(src, output, dtype=dtype, name=name, mau_declaration=mau_declaration,
                                 fix_name=fix_name, force=force,
                                 mmproj=mmproj if mmproj and mmproj.lower() not in ("auto", "none") else None,
                                 progress=out.progress())
        out.result({"source": src, "format": "hf", "path": str(res.path), "tensors": res.tensors,
                    "dtype": res.dtype}, lambda c: c.print(f"wrote {res.path} ({res.tensors} tensors, {res.dtype})"))
        return
    if (source_format, target) == ("hf", "onnx"):
        from converters.onnx_export import convert_hf_to_onnx

        res_onnx = convert_hf_to_onnx(src, output, dtype="fp32" if dtype == "auto" else dtype,
                                      kv_cache=not no_kv_cache, opset=opset, name=name,
                                      mau_declaration=mau_declaration, fix_name=fix_name, force=force, vision=vision,
                                      progress=out.progress())
        for w in res_onnx.warnings:
            out.warn(w)
        out.result({"source": src, "format": "onnx", "path": str(res_onnx.path), "tensors": res_onnx.tensors,
                    "bytes": res_onnx.bytes, "dtype": res_onnx.dtype, "kv_cache": res_onnx.kv_cache,
                    "opset": res_onnx.opset},
                   lambda c: c.print(f"wrote {res_onnx.path} ({res_onnx.dtype}, opset {res_onnx.opset}, "
                                     f"{'with' if res_onnx.kv_cache else 'without'} KV cache, {res_onnx.tensors} "
                                     f"tensors, {res_onnx.bytes / 2**20:.1f} MiB)"))
        return
    if (source_format, target) == ("onnx", "hf"):
        from converters.onnx_to_hf import convert_onnx_to_hf

        res_hf = convert_onnx_to_hf(src, output, name=name, mau_declaration=mau_declaration, fix_name=fix_name,
                                    force=force, progress=out.progress())
        out.result({"source": src, "format": "hf", "path": str(res_hf.path), "tensors": res_hf.tensors,
                    "dtype": res_hf.dtype},
                   lambda c: c.print(f"wrote {res_hf.path} ({res_hf.tensors} tensors, {res_hf.dtype})"))
        return
    from converters.registry import converter_for

    converter_for(source_format, target)  # raises the usage error naming the supported pairs
    raise UsageError(f"cannot convert {source_format} to {target} yet")
