"""`corral merge`: LoRA adapters into a Llama 4 checkpoint, routed experts included, streamed; with --method or
--config, a weight merge of full fine-tunes (mergekit's methods)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from toolbox.cli._typer import typer
from toolbox.cli.choices import CHAIN_OUTTYPE_HELP, ConvertOutType, MergeDtype, MergeTarget, WeightMethod
from toolbox.cli.convert_cmd import (
    ImatrixOpt,
    OutputTensorTypeOpt,
    PureOpt,
    TensorTypeOpt,
    TokenEmbeddingTypeOpt,
    quant_options,
)
from toolbox.cli.options import (
    BaseModelOpt,
    BomOpt,
    FixNameOpt,
    ForceOpt,
    MauDeclarationOpt,
    NameOpt,
    ShardSizeOpt,
    shard_bytes,
)
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

  corral merge ./base ./lora -o scout-ft-dyn.gguf --to gguf --outtype scout-dynamic   # a built-in dynamic mix

  corral merge ./base ./lora -o ft.gguf --to gguf --outtype q4_k_m --tensor-type 'attn_v=q8_0' --imatrix im.gguf

  corral merge demo:scout ./my-lora -o ./merged --bom spdx    # + ./merged/bom.spdx.json (SPDX 2.3)

  corral merge ./base ./lora -o ./merged --shard-size 2G   # model-0000i-of-0000n.safetensors of at most 2 GB

Weight merges of full fine-tunes of the same base (--method or --config; Scout with Scout,
Maverick with Maverick, any layout corral reads), equal to mergekit's methods and streamed one
expert slice or row block of every input at a time. BASE is the base; the other arguments are
the fine-tuned models. linear averages the models (BASE only supplies config and tokenizer);
ties, dare_ties and dare_linear take --density (one for all, or one per model); DARE's masks come
from --seed, per tensor, so a rerun is byte-identical; slerp takes --t (0: BASE); model_stock
needs two models or more. --config reads mergekit's YAML (merge_method, base_model, models with
weight/density, parameters, dtype/out_dtype; gradients and filters per tensor; whole-model slices),
refusing what it does not support with FILE:LINE.

  corral merge --method ties ./scout ./ft-a ./ft-b --weight 0.6 --weight 0.4 --density 0.5 -o ./Llama-4-ties

  corral merge --method slerp ./scout ./ft-a --t 0.3 -o ./Llama-4-slerp

  corral merge --method ties meta-llama/Llama-4-Scout-17B-16E-Instruct acme/ft-a ./ft-b -o ./m   # Hub ids: fetched

  corral merge --method dare_ties ./scout ./ft-a ./ft-b --density 0.3 --seed 7 -o ./Llama-4-dare

  corral merge --method linear ./scout ./ft-a ./ft-b -o ./Llama-4-avg --shard-size 500M

  corral merge --config merge.yaml -o ./Llama-4-merged --mau-declaration below-700m
"""
SHOW_ROWS = 40


WeightOpt = Annotated[list[float] | None, typer.Option("--weight", "-w", help="Weight of each adapter's delta, "
                                                       "once per adapter in order (default 1).",
                                                       show_default=False)]
DtypeOpt = Annotated[MergeDtype, typer.Option("--dtype", case_sensitive=False,
                                              help="Output dtype (auto: the base's).")]
ToOpt = Annotated[MergeTarget, typer.Option("--to", case_sensitive=False, help="Output format: hf, or gguf "
                                            "(the merged tensors streamed into the converter, no HF copy on disk; "
                                            "onnx: merge, then corral convert).")]
OuttypeOpt = Annotated[ConvertOutType, typer.Option("--outtype", case_sensitive=False, help=CHAIN_OUTTYPE_HELP)]
MethodOpt = Annotated[WeightMethod | None, typer.Option("--method", case_sensitive=False,
                                                        help="Weight merge of full fine-tunes instead of LoRA.",
                                                        show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="mergekit YAML merge configuration.",
                                                show_default=False)]
DensityOpt = Annotated[list[float] | None, typer.Option("--density", help="ties/dare: share of each delta kept, "
                                                        "once for all or once per model (default 1).",
                                                        show_default=False)]
NormalizeOpt = Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Divide by the sum of "
                                                   "weights (default: the method's, as mergekit).",
                                                   show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of DARE's random masks.")]
SlerpTOpt = Annotated[float | None, typer.Option("--t", help="slerp: interpolation factor (0: BASE, 1: the model).",
                                            show_default=False)]


def merge(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (or .gguf file with --to gguf).",
                                         show_default=False)],
    base: Annotated[str | None, typer.Argument(help="Base HF checkpoint directory, demo:scout|demo:maverick, or "
                                               "(--method) a Hub repo id.",
                                               metavar="BASE", show_default=False)] = None,
    adapters: Annotated[list[str] | None, typer.Argument(help="PEFT adapter directories (adapter_config.json + "
                                                          "adapter_model.safetensors), or Hub repo ids; with "
                                                          "--method, the fine-tuned models (directories or "
                                                          "Hub repo ids).",
                                                          metavar="ADAPTER...",
                                                          show_default=False)] = None,
    weight: WeightOpt = None,
    dtype: DtypeOpt = "auto",
    to: ToOpt = "hf",
    outtype: OuttypeOpt = "auto",
    method: MethodOpt = None,
    config: ConfigOpt = None,
    density: DensityOpt = None,
    normalize: NormalizeOpt = None,
    seed: SeedOpt = 0,
    t: SlerpTOpt = None,
    name: NameOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: BaseModelOpt = None,
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTensorTypeOpt = None,
    token_embedding_type: TokenEmbeddingTypeOpt = None,
    pure: PureOpt = False,
    imatrix: ImatrixOpt = None,
    bom: BomOpt = None,
    shard_size: ShardSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge LoRA adapters (or, with --method/--config, full fine-tunes) into a Llama 4 checkpoint, streamed."""
    from toolbox.cli.bom_cmd import need_bom, with_boms
    from toolbox.errors import UsageError
    from toolbox.merge.merge import merge_adapters

    out = ctx.obj
    need_bom(bom)
    quant = quant_options(tensor_type, output_tensor_type, token_embedding_type, pure, imatrix)
    if to != "gguf":  # per-tensor options an HF output would silently ignore are refused before any work
        from toolbox.merge.chain import check_quant

        check_quant(to, outtype, quant)
    if method is not None or config is not None:
        from license.stamp import LicenseOptions

        if to != "hf":
            raise UsageError("weight merges write HF checkpoints", hint="convert the result with corral convert")
        opts = LicenseOptions(name=name, mau_declaration=mau_declaration, fix_name=fix_name, base_model=base_model)
        wres = _weight_merge(base, [str(a) for a in adapters or []], output, method, config, weight, density,
                             normalize, seed, t, dtype, force, opts, out.progress(), shard_bytes(shard_size))
        out.result(*with_boms(out, [wres.path], bom, {"format": "hf", **wres.to_dict()},
                              lambda c: c.print(f"wrote {wres.path} ({wres.name}: {wres.method}, {wres.tensors} "
                                                f"tensors, {len(wres.inputs) - 1} models)", markup=False)))
        return
    if base is None or not adapters:
        raise UsageError("give BASE and one or more ADAPTER directories",
                         hint="or --method METHOD BASE MODEL... / --config merge.yaml for a weight merge")
    max_shard_bytes = shard_bytes(shard_size, to)
    if to == "gguf":
        _lora_to_gguf(out, base, list(adapters), output, bom, weights=weight, dtype=dtype, outtype=outtype, name=name,
                      mau_declaration=mau_declaration, fix_name=fix_name, force=force, base_model=base_model,
                      **quant)
        return
    res = merge_adapters(base, list(adapters), output, weights=weight, dtype=dtype, name=name,
                         mau_declaration=mau_declaration, fix_name=fix_name, force=force, base_model=base_model,
                         progress=out.progress(), max_shard_bytes=max_shard_bytes)
    for w in res.warnings:
        out.warn(w)

    out.result(*with_boms(out, [res.path], bom, {"base": base, "format": "hf", **res.to_dict()},
                          lambda console: _render_lora(console, res, out.verbose)))


def _lora_to_gguf(out: Any, base: str, adapters: list[str], output: Path, bom: Any, **kwargs: Any) -> None:
    """--to gguf: `toolbox.merge.chain.merge_to_gguf` (the merged tensors streamed into the converter)."""
    from toolbox.cli.bom_cmd import with_boms
    from toolbox.merge.chain import merge_to_gguf

    gres = merge_to_gguf(base, list(adapters), output, progress=out.progress(), **kwargs)
    for w in gres.warnings:
        out.warn(w)
    out.result(*with_boms(out, gres.paths, bom, {"base": base, "format": "gguf", **gres.to_dict()},
                          lambda c: c.print(f"wrote {', '.join(gres.paths)} ({gres.outtype}, "
                                            f"{gres.merged_tensors} tensors merged)", markup=False)))


def _render_lora(console: object, res: Any, verbose: bool) -> None:
    """The LoRA merge's table: the tensors that lost most to rounding (all with --verbose)."""
    from rich.table import Table

    rows = res.merged if verbose or len(res.merged) <= SHOW_ROWS else sorted(
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


def _weight_merge(base: str | None, models: list[str], output: Path, method: object, config: Path | None,
                  weight: list[float] | None, density: list[float] | None, normalize: bool | None, seed: int,
                  t: float | None, dtype: str, force: bool, opts: object, progress: object,
                  max_shard_bytes: int | None = None) -> object:
    """--method BASE MODEL... or --config FILE (which names the inputs itself) to `merge_weights`."""
    from toolbox.errors import UsageError
    from toolbox.merge.weights import merge_weights

    if config is not None:
        from toolbox.recipe.mergekit_config import load_merge_config

        if method is not None or base is not None or weight or density or normalize is not None or t is not None:
            raise UsageError("--config names the method, the models and their parameters itself",
                             hint="drop --method, BASE, MODEL..., --weight, --density, --normalize and --t")
        cfg = load_merge_config(config)
        kwargs = cfg.kwargs()
        if dtype != "auto":
            kwargs["dtype"] = dtype
        return merge_weights(cfg.base, list(cfg.models), output, seed=seed, force=force,
                             license_options=opts, progress=progress,  # type: ignore[arg-type]
                             extra_op={"config": config.name}, max_shard_bytes=max_shard_bytes, **kwargs)
    if base is None or not models:
        raise UsageError("--method needs BASE and the fine-tuned MODEL directories")
    return merge_weights(base, models, output, method=str(method), weights=weight,
                         densities=density, normalize=normalize, t=t, seed=seed, dtype=dtype, force=force,
                         license_options=opts, progress=progress,  # type: ignore[arg-type]
                         max_shard_bytes=max_shard_bytes)
