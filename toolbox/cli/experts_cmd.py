"""`corral experts`: router statistics, expert pruning, dense extraction and comparison."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from toolbox.cli._typer import typer
from toolbox.cli.choices import CHAIN_OUTTYPE_HELP, ComputeDtype, ConvertOutType, Criterion, MergeTarget
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
    OutputDirOpt,
    ShardSizeOpt,
    shard_bytes,
)

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="Expert surgery on Llama 4 MoE checkpoints: statistics, pruning, dense extraction.",
                  no_args_is_help=True)

_CALIBRATION = """\
Calibration data: a .txt file, a .jsonl file with a "text" field per line, or a chat .jsonl
with "messages" [{role, content}, ...] per line (rendered with the model's chat template).
The forward pass runs one decoder layer at a time, so memory is one layer plus activations.
HF checkpoints only: a GGUF or ONNX model is refused (exit 3); convert --to hf first.
"""
_GGUF = """\
With --to gguf, --tensor-type REGEX=TYPE, --output-tensor-type, --token-embedding-type, --pure and
--imatrix work as in corral convert (with a llama.cpp mix or dynamic --outtype): the GGUF equals corral
convert of the HF output with the same options. An --imatrix must fit the output's shapes (an entry made
on the unpruned experts is refused, exit 3); without --to gguf these options are refused (exit 2).
"""
_LICENSE = "Outputs carry the Llama 4 license stamp; the operation, criterion and kept experts are in the provenance.\n"

STATS_EPILOG = _CALIBRATION + """
Examples:

  corral experts stats demo:scout --calibration notes.txt --max-tokens 512 --top 4

  corral experts stats demo:maverick --calibration chats.jsonl --csv > maverick-stats.csv

  corral --json experts stats demo:scout --calibration notes.txt > scout-stats.json
"""

PRUNE_EPILOG = _CALIBRATION + """
Examples:

  corral experts prune demo:scout -o ./scout-8e --keep 0-7 --mau-declaration below-700m

  corral experts prune demo:scout -o ./scout-8e --drop "0:1,2,3,4,5,6,7,8;1:0-7;2:8-15;3:0-3,12-15"

  corral experts prune ./Llama-4-Scout-17B-16E-Instruct -o ./scout-12e --keep-count 12 --criterion reap \\
      --calibration code.jsonl --mau-declaration below-700m

  corral experts prune demo:scout -o ./scout-12e --keep-count 12 --stats scout-stats.json

  corral experts prune demo:scout -o scout-8e.gguf --keep 0-7 --to gguf --outtype q8_0   # no HF copy on disk

  corral experts prune ./Scout -o s8.gguf --keep 0-7 --to gguf --outtype q4_k_m --tensor-type 'attn_v=q8_0'

  corral experts prune demo:scout -o ./scout-8e --keep 0-7 --bom cyclonedx   # + ./scout-8e/bom.cdx.json

  corral experts prune ./Llama-4-Scout-17B-16E-Instruct -o ./scout-8e --keep 0-7 --shard-size 2G   # 2 GB files

Expert lists: "0,2,5-7" for every MoE layer, or "LAYER:LIST;LAYER:LIST" naming each MoE layer.
The same number of experts must remain in every MoE layer, and at least num_experts_per_tok.
""" + _GGUF + _LICENSE

EXTRACT_EPILOG = _CALIBRATION + """
Examples:

  corral experts extract demo:maverick -o ./maverick-dense --dense auto --calibration notes.txt

  corral experts extract demo:scout -o ./scout-dense --dense "0:3;1:5;2:0;3:7" --mau-declaration below-700m

  corral experts extract demo:scout -o scout-dense.gguf --dense 3 --to gguf --outtype q8_0   # no HF copy on disk

  corral experts extract ./Llama-4-Scout-17B-16E-Instruct -o ./scout-dense --dense 3 --shard-size 1GiB

  corral experts extract ./Scout -o dense.gguf --dense 3 --to gguf --outtype scout-dynamic --pure

--dense auto folds each layer's most used routed expert (measured on --calibration, or read from --stats).
""" + _GGUF + _LICENSE

COMPARE_EPILOG = _CALIBRATION + """
Examples:

  corral experts compare demo:scout ./scout-8e --calibration heldout.txt

  corral --json experts compare ./Llama-4-Scout-17B-16E-Instruct ./scout-12e --calibration heldout.jsonl
"""

CalibrationOpt = Annotated[Path | None, typer.Option("--calibration", help="Calibration text (.txt, .jsonl).",
                                                     show_default=False)]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Use at most this many calibration tokens.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")]
DtypeOpt = Annotated[ComputeDtype, typer.Option(
    "--dtype", case_sensitive=False,
    help="Compute dtype of the layer-streamed forward pass (bfloat16: half the memory per layer).")]
StatsOpt = Annotated[Path | None, typer.Option("--stats", help="Statistics saved by 'corral --json experts stats' "
                                               "(instead of measuring them now).", show_default=False)]


@app.command("stats", epilog=STATS_EPILOG)
def stats(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory or demo:scout|demo:maverick.", metavar="SRC",
                                       show_default=False)],
    calibration: CalibrationOpt = None,
    max_tokens: MaxTokensOpt = 2048,
    seq_len: SeqLenOpt = 512,
    dtype: DtypeOpt = "float32",
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV on stdout, one row per layer and expert (all of "
                                          "them; not with --json).")] = False,
    top: Annotated[int | None, typer.Option("--top", min=1, show_default=False,
                                            help="Show only the N most used experts of each layer (text "
                                            "output; --json and --csv keep every row).")] = None,
) -> None:
    """Per-layer, per-expert router statistics: frequency, router score, REAP saliency, output norm."""
    import sys

    from toolbox.errors import UsageError
    from toolbox.experts.stats import router_stats, stats_csv

    out = ctx.obj
    if out.json_mode and csv_out:
        raise UsageError("--json and --csv exclude each other", hint="one output format per run: drop one")
    if calibration is None:
        raise UsageError("statistics need calibration data", hint="pass --calibration FILE (.txt or .jsonl)")
    result = router_stats(src, calibration, max_tokens=max_tokens, seq_len=seq_len, dtype=dtype,
                          progress=out.progress())
    if csv_out:
        sys.stdout.write(stats_csv(result))
        return

    def render(c: Console) -> None:
        from rich.table import Table

        c.print(f"{result.tokens} calibration tokens, {result.experts} experts, top-{result.top_k}")
        for layer, all_rows in result.layers.items():
            rows = all_rows if top is None else sorted(all_rows, key=lambda e: -e.frequency)[:top]
            shown = "" if len(rows) == len(all_rows) else f" (the {len(rows)} most used of {len(all_rows)})"
            table = Table(title=f"MoE layer {layer}{shown}")
            for col in ("expert", "freq", "mean prob", "mean score", "out norm", "REAP", "EAN"):
                table.add_column(col, justify="right")
            for e in rows:
                table.add_row(str(e.expert), f"{e.frequency:.4f}", f"{e.mean_prob:.4f}", f"{e.mean_score:.4f}",
                              f"{e.mean_output_norm:.4g}", f"{e.reap:.4g}", f"{e.ean:.4g}")
            c.print(table)
    out.result(result.to_dict(), render)


@app.command("prune", epilog=PRUNE_EPILOG)
def prune(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory or demo:scout|demo:maverick.", metavar="SRC",
                                       show_default=False)],
    output: OutputDirOpt,
    keep: Annotated[str | None, typer.Option("--keep", help="Experts to keep (see below).", show_default=False)]
    = None,
    drop: Annotated[str | None, typer.Option("--drop", help="Experts to drop (see below).", show_default=False)]
    = None,
    keep_count: Annotated[int | None, typer.Option("--keep-count", help="Keep this many experts per MoE layer, "
                                                   "chosen by --criterion.", show_default=False)] = None,
    criterion: Annotated[Criterion, typer.Option("--criterion", case_sensitive=False,
                                                  help="How experts are ranked (random: with --seed).")] = "reap",
    seed: Annotated[int, typer.Option("--seed", help="Seed of --criterion random.")] = 0,
    calibration: CalibrationOpt = None,
    stats_file: StatsOpt = None,
    max_tokens: MaxTokensOpt = 2048,
    seq_len: SeqLenOpt = 512,
    dtype: DtypeOpt = "float32",
    to: Annotated[MergeTarget, typer.Option("--to", case_sensitive=False, help="Output format: hf, or gguf (-o a "
                                            ".gguf file; the pruned tensors go straight into the converter).")]
    = "hf",
    outtype: Annotated[ConvertOutType, typer.Option("--outtype", case_sensitive=False, help=CHAIN_OUTTYPE_HELP)]
    = "auto",
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTensorTypeOpt = None,
    token_embedding_type: TokenEmbeddingTypeOpt = None,
    pure: PureOpt = False,
    imatrix: ImatrixOpt = None,
    name: NameOpt = None,
    base_model: BaseModelOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    bom: BomOpt = None,
    shard_size: ShardSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Remove routed experts: the same number kept in every MoE layer, router rows sliced in step."""
    from toolbox.cli.bom_cmd import need_bom, with_boms
    from toolbox.errors import UsageError
    from toolbox.experts.prune import prune_by_criterion, prune_experts
    from toolbox.experts.selection import parse_spec
    from toolbox.experts.stats import load_stats

    out = ctx.obj
    given = [x for x in (keep, drop, keep_count) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --keep, --drop or --keep-count")
    need_bom(bom)
    common = {"name": name, "mau_declaration": mau_declaration, "fix_name": fix_name, "force": force,
              "base_model": base_model, "progress": out.progress(), "to": to, "outtype": outtype,
              "max_shard_bytes": shard_bytes(shard_size, to),
              **quant_options(tensor_type, output_tensor_type, token_embedding_type, pure, imatrix)}
    if keep_count is not None:
        if criterion != "random" and calibration is None and stats_file is None:
            raise UsageError(f"--criterion {criterion} needs --calibration DATA (or --stats FILE)")
        result = prune_by_criterion(src, output, count=keep_count, criterion=criterion, calibration=calibration,
                                    stats=load_stats(stats_file) if stats_file else None, seed=seed,
                                    max_tokens=max_tokens, seq_len=seq_len, dtype=dtype, **common)
    else:
        result = prune_experts(src, output, keep=parse_spec(keep) if keep is not None else None,
                               drop=parse_spec(drop) if drop is not None else None, **common)
    data = {"source": src, "path": str(result.path), "name": result.name, "experts_before": result.experts_before,
            "experts_after": result.experts_after, "criterion": result.criterion, "bytes": result.bytes,
            "kept": {str(k): v for k, v in result.kept.items()}}
    out.result(*with_boms(out, [result.path], bom, data, lambda c: c.print(
        f"wrote {result.path} ({result.experts_before} -> {result.experts_after} experts per MoE layer, "
        f"{result.bytes / 2**20:.1f} MiB)", markup=False)))


@app.command("extract", epilog=EXTRACT_EPILOG)
def extract(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory or demo:scout|demo:maverick.", metavar="SRC",
                                       show_default=False)],
    output: OutputDirOpt,
    dense: Annotated[str, typer.Option("--dense", help="Routed expert folded with the shared expert: a number, "
                                       "'LAYER:E;LAYER:E', or auto (each layer's most used).", show_default=False)],
    calibration: CalibrationOpt = None,
    stats_file: StatsOpt = None,
    max_tokens: MaxTokensOpt = 2048,
    to: Annotated[MergeTarget, typer.Option("--to", case_sensitive=False, help="Output format: hf, or gguf (-o a "
                                            ".gguf file; the folded tensors go straight into the converter).")]
    = "hf",
    outtype: Annotated[ConvertOutType, typer.Option("--outtype", case_sensitive=False, help=CHAIN_OUTTYPE_HELP)]
    = "auto",
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTensorTypeOpt = None,
    token_embedding_type: TokenEmbeddingTypeOpt = None,
    pure: PureOpt = False,
    imatrix: ImatrixOpt = None,
    name: NameOpt = None,
    base_model: BaseModelOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    bom: BomOpt = None,
    shard_size: ShardSizeOpt = None,
    force: ForceOpt = False,
) -> None:
    """A dense model: each MoE layer becomes shared expert + one routed expert as one MLP."""
    from toolbox.cli.bom_cmd import need_bom, with_boms
    from toolbox.errors import UsageError
    from toolbox.experts.extract import extract_dense, most_used_experts
    from toolbox.experts.selection import parse_ids, parse_spec
    from toolbox.experts.stats import load_stats
    from toolbox.merge.chain import check_quant

    out = ctx.obj
    need_bom(bom)
    quant = quant_options(tensor_type, output_tensor_type, token_embedding_type, pure, imatrix)
    check_quant(to, outtype, dict(quant))  # before --dense auto's calibration pass
    max_shard_bytes = shard_bytes(shard_size, to)
    extra = {}
    if dense.strip().lower() == "auto":
        expert: int | dict[int, int]
        expert, extra = most_used_experts(src, calibration, stats=load_stats(stats_file) if stats_file else None,
                                          max_tokens=max_tokens, progress=out.progress())
    elif ":" in dense:
        per = parse_spec(dense)
        assert isinstance(per, dict)
        if any(len(v) != 1 for v in per.values()):
            raise UsageError("--dense LAYER:E names one expert per layer")
        expert = {k: v[0] for k, v in per.items()}
    else:
        ids = parse_ids(dense)
        if len(ids) != 1:
            raise UsageError(f"--dense {dense!r}: give one expert number, a per-layer list, or auto")
        expert = ids[0]
    result = extract_dense(src, output, expert=expert, name=name, mau_declaration=mau_declaration, fix_name=fix_name,
                           force=force, base_model=base_model, extra_provenance=extra, progress=out.progress(),
                           to=to, outtype=outtype, max_shard_bytes=max_shard_bytes, **quant)
    data = {"source": src, "path": str(result.path), "name": result.name, "bytes": result.bytes,
            "experts": {str(k): v for k, v in result.experts.items()}}
    out.result(*with_boms(out, [result.path], bom, data, lambda c: c.print(
        f"wrote dense model {result.path} ({result.bytes / 2**20:.1f} MiB; experts "
        f"{', '.join(f'{k}:{v}' for k, v in result.experts.items())})", markup=False)))


@app.command("compare", epilog=COMPARE_EPILOG)
def compare(
    ctx: typer.Context,
    original: Annotated[str, typer.Argument(help="The original checkpoint.", metavar="ORIGINAL", show_default=False)],
    other: Annotated[str, typer.Argument(help="The pruned or extracted checkpoint.", metavar="OTHER",
                                         show_default=False)],
    calibration: CalibrationOpt = None,
    max_tokens: MaxTokensOpt = 2048,
    seq_len: SeqLenOpt = 512,
    dtype: DtypeOpt = "float32",
) -> None:
    """Next-token KL divergence, top-1 agreement and perplexity of OTHER against ORIGINAL."""
    from toolbox.errors import UsageError
    from toolbox.experts.compare import compare_models

    out = ctx.obj
    if calibration is None:
        raise UsageError("comparison needs held-out text", hint="pass --calibration FILE (.txt or .jsonl)")
    r = compare_models(original, other, calibration, max_tokens=max_tokens, seq_len=seq_len, dtype=dtype,
                       progress=out.progress())
    out.result(r.to_dict(), lambda c: c.print(
        f"{r.tokens} positions: KL {r.kl:.5f} nats/token, top-1 agreement {r.top1_agreement:.2%}, "
        f"perplexity {r.perplexity_original:.2f} (original) vs {r.perplexity_other:.2f}"))
