"""`corral imatrix`: llama.cpp's importance matrix computed from the HF checkpoint, layer-streamed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from toolbox.cli._typer import typer
from toolbox.cli.choices import ComputeDtype
from toolbox.cli.options import BaseModelOpt, FixNameOpt, ForceOpt, MauDeclarationOpt, NameOpt

if TYPE_CHECKING:
    from rich.console import Console

EPILOG = """\
Writes llama.cpp's GGUF imatrix format (per weight <tensor>.in_sum2 and <tensor>.counts, one row
per routed expert), which llama-quantize --imatrix, llama-imatrix --show-statistics and
corral convert --imatrix read. The text is cut as llama-imatrix cuts it: chunks of --chunk
tokens, each starting with BOS; the forward pass runs one decoder layer at a time (memory: one
layer plus activations). --all-experts also gives every routed expert statistics on every token,
its input scaled by its own router score sigmoid(logit) (the input it would get if routed), so
no expert is left uncalibrated; it costs n_experts / top_k times the experts' work.
--in-file adds files as llama-imatrix --in-file does (with no --calibration: only combines).
The file carries the Llama 4 license stamp.

Examples:

  corral imatrix demo:scout --calibration notes.txt -o scout.imatrix.gguf --mau-declaration below-700m

  corral imatrix ./Llama-4-Maverick-17B-128E-Instruct --calibration code.txt -o maverick.imatrix.gguf \\
      --all-experts --chunk 512

  corral imatrix demo:scout -o both.imatrix.gguf --in-file a.imatrix.gguf --in-file b.imatrix.gguf

  corral convert demo:scout --to gguf --outtype iq2_xs --imatrix scout.imatrix.gguf -o scout-iq2_xs.gguf
"""


def imatrix(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory or demo:scout|demo:maverick.", metavar="SRC",
                                       show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The imatrix file to write (.gguf).",
                                         show_default=False)],
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Calibration text (.txt, .jsonl).",
                                                     show_default=False)] = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens per chunk (llama-imatrix -c).")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Use at most this many chunks (default: all).",
                                               show_default=False)] = None,
    all_experts: Annotated[bool, typer.Option("--all-experts", help="Statistics for every routed expert on "
                                              "every token, weighted by its router score.")] = False,
    in_file: Annotated[list[Path] | None, typer.Option("--in-file", help="An imatrix file to add (repeatable).",
                                                       show_default=False)] = None,
    dtype: Annotated[ComputeDtype, typer.Option("--dtype", case_sensitive=False,
                                                help="Compute dtype of the forward pass.")] = "float32",
    name: NameOpt = None,
    base_model: BaseModelOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    force: ForceOpt = False,
) -> None:
    """Compute an importance matrix for llama-quantize / corral convert --imatrix."""
    from license.stamp import LicenseOptions
    from toolbox.experts.imatrix import compute_imatrix

    out = ctx.obj
    r = compute_imatrix(src, output, calibration, chunk=chunk, max_chunks=chunks, all_experts=all_experts,
                        in_files=in_file or [], dtype=dtype, force=force, progress=out.progress(),
                        license_options=LicenseOptions(name=name, mau_declaration=mau_declaration,
                                                       fix_name=fix_name, base_model=base_model))

    def render(c: Console) -> None:
        c.print(f"wrote {r.path}: {r.entries} entries, {r.chunks} chunks of {r.chunk_size} tokens"
                f"{' (all experts)' if r.all_experts else ''}", markup=False)
        for layer, routed in r.routed.items():
            seen = r.seen.get(layer, routed)
            c.print(f"  MoE layer {layer}: tokens routed per expert {routed}"
                    + ("" if seen == routed else f"; with statistics {seen}"), markup=False)
        if r.uncalibrated():
            c.print(f"{r.uncalibrated()} experts saw no token (llama-quantize uses weights of 1 for them); "
                    "--all-experts calibrates every expert", markup=False)
    out.result(r.to_dict(), render)
