"""`corral merge`: LoRA adapters into a Llama 4 checkpoint, routed experts included, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from toolbox.cli._typer import typer
from toolbox.cli.choices import OUTTYPES, MergeDtype, MergeTarget, OutType
from toolbox.cli.options import BaseModelOpt, FixNameOpt, ForceOpt, MauDeclarationOpt, NameOpt
from toolbox.cli.output import plain

EPILOG = """\
Merges PEFT LoRA adapters (attention, shared expert, dense MLPs, vision tower; routed experts
through target_parameters in today's and the peft 0.17-0.19.0 layout, or per-expert keys;
rsLoRA, DoRA on linear layers, rank/alpha patterns, modules_to_save) into the base, one
tensor or expert slice at a time. Several adapters add up as a weighted sum of their deltas.
Any adapter key that matches no base tensor, or does not fit it, is an error (exit 3), as is an
adapter_config.json field of the wrong type or out of bounds, a rank/alpha pattern RE2 cannot
compile, NaN/Inf in an adapter tensor, or a merged tensor that overflows to NaN/Inf.

The output is a license-stamped HF checkpoint: its name must begin with "Llama" and you must
declare where you stand on the 700M monthly-active-user threshold.

Examples:

  corral merge demo:scout ./my-lora -o ./Llama-4-Scout-my-ft --mau-declaration below-700m

  corral merge ./Llama-4-Scout-17B-16E-Instruct ./style ./domain --weight 0.7 --weight 0.3 -o ./merged

  corral --json merge ./base ./lora --dtype f32 -o ./merged-f32

  corral merge ./base ./lora -o scout-ft.gguf --to gguf --outtype q8_0
"""
SHOW_ROWS = 40


def merge(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="Base HF checkpoint directory, or demo:scout|demo:maverick.",
                                        metavar="BASE", show_default=False)],
    adapters: Annotated[list[Path], typer.Argument(help="PEFT adapter directories (adapter_config.json + "
                                                   "adapter_model.safetensors), or Hub repo ids.",
                                                   metavar="ADAPTER...",
                                                   show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (or .gguf file with --to gguf).",
                                         show_default=False)],
    weight: Annotated[list[float] | None, typer.Option("--weight", "-w", help="Weight of each adapter's delta, "
                                                       "once per adapter in order (default 1).",
                                                       show_default=False)] = None,
    dtype: Annotated[MergeDtype, typer.Option("--dtype", case_sensitive=False,
                                              help="Output dtype (auto: the base's).")] = "auto",
    to: Annotated[MergeTarget, typer.Option("--to", case_sensitive=False, help="Output format: hf, or gguf "
                                            "(merged, then converted; onnx: merge, then corral convert).")] = "hf",
    outtype: Annotated[OutType, typer.Option("--outtype", case_sensitive=False,
                                             help=f"GGUF tensor type with --to gguf: {', '.join(OUTTYPES)}.")]
    = "auto",
    name: NameOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: BaseModelOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge LoRA adapters into a Llama 4 checkpoint, streaming one tensor slice at a time."""
    from toolbox.merge.merge import merge_adapters

    out = ctx.obj
    if to == "gguf":
        from toolbox.merge.chain import merge_to_gguf

        gres = merge_to_gguf(base, list(adapters), output, weights=weight, dtype=dtype, outtype=outtype, name=name,
                             mau_declaration=mau_declaration, fix_name=fix_name, force=force,
                             base_model=base_model, progress=out.progress())
        for w in gres.warnings:
            out.warn(w)
        out.result({"base": base, "format": "gguf", **gres.to_dict()},
                   lambda c: c.print(f"wrote {', '.join(gres.paths)} ({gres.outtype}, {gres.merged_tensors} "
                                     "tensors merged)", markup=False))
        return
    res = merge_adapters(base, list(adapters), output, weights=weight, dtype=dtype, name=name,
                         mau_declaration=mau_declaration, fix_name=fix_name, force=force, base_model=base_model,
                         progress=out.progress())
    for w in res.warnings:
        out.warn(w)

    def render(console: object) -> None:
        from rich.table import Table

        rows = res.merged if out.verbose or len(res.merged) <= SHOW_ROWS else sorted(
            res.merged, key=lambda t: -t.lost_share)[:SHOW_ROWS]
        table = Table(box=None)  # whole tensor names (q/k/v/o differ only at the end): wrapped, never cut
        table.add_column("tensor", overflow="fold", min_width=min(max((len(t.name) for t in rows), default=6), 90))
        for col in ("adapters", "delta norm", "lost to rounding"):
            table.add_column(col, overflow="fold")
        for t in rows:
            table.add_row(plain(t.name), ",".join(str(i) for i in t.adapters), f"{t.delta_norm:.4g}",
                          f"{t.lost_share:.2%}")
        console.print(table)  # type: ignore[attr-defined]
        if len(rows) < len(res.merged):
            console.print(f"(the {len(rows)} of {len(res.merged)} merged tensors that lost most; --verbose or "  # type: ignore[attr-defined]
                          "--json for all)")
        console.print(f"wrote {res.path} ({res.name}: {res.tensors} tensors, {len(res.merged)} merged)", markup=False)  # type: ignore[attr-defined]

    out.result({"base": base, "format": "hf", **res.to_dict()}, render)
