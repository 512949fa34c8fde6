"""`corral extract-lora`: a full fine-tune turned back into a PEFT LoRA adapter, routed experts included."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from toolbox.cli._typer import typer
from toolbox.cli.options import BaseModelOpt, BomOpt, FixNameOpt, ForceOpt, MauDeclarationOpt, NameOpt
from toolbox.cli.output import plain
from toolbox.merge_choices import FACTOR_DTYPES, SVD_METHODS, TARGET_GROUPS

SvdMethod: Any = Literal[SVD_METHODS]  # type: ignore[valid-type]
FactorDtype: Any = Literal[tuple(FACTOR_DTYPES)]  # type: ignore[valid-type]
SHOW_ROWS = 40

EPILOG = """\
Factors FINETUNE - BASE by truncated SVD, one tensor or expert slice at a time, into a PEFT
LoRA adapter: attention (q/k/v/o), shared expert and dense MLP weights as LoRA modules, routed
experts through target_parameters in the layout peft >= 0.19.1 reads (and corral merge).
alpha defaults to the rank (scaling 1). The report gives each tensor's retained energy (kept
singular values squared over the total) and relative Frobenius error of the stored factors;
tensors outside the targets that differ are named in a warning. Inputs of different shapes
or variants are exit 3; a rank outside 1..min(dims) of a tensor, or an existing output
without --force, is exit 2.

The adapter is license-stamped (relation adapter, both inputs' file hashes in the provenance):
its name must begin with "Llama" and you must declare where you stand on the 700M
monthly-active-user threshold.

Examples:

  corral extract-lora ./Llama-4-Scout-my-ft --base ./Llama-4-Scout-17B-16E-Instruct -o ./my-lora --rank 16

  corral extract-lora ./ft --base ./base -o ./lora --rank 8 --rank-pattern 'experts.down_proj=4' \\
      --target attention --target experts --dtype bf16

  corral --json extract-lora ./ft --base demo:scout -o ./lora --rank 4 | jq '.tensors[] | .relative_error'

  corral extract-lora ./ft --base ./base -o ./lora --rank 8 --bom cyclonedx   # + ./lora/bom.cdx.json
"""


def extract_lora(
    ctx: typer.Context,
    finetune: Annotated[str, typer.Argument(help="Fine-tuned HF checkpoint directory.", metavar="FINETUNE",
                                            show_default=False)],
    base: Annotated[str, typer.Option("--base", help="The base checkpoint it was fine-tuned from (a directory, or "
                                      "demo:scout|demo:maverick).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter directory to write (created atomically).",
                                         show_default=False)],
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank of every target.", show_default=False)],
    rank_pattern: Annotated[list[str] | None, typer.Option(
        "--rank-pattern", help="REGEX=R: rank R for the targets REGEX ends on a dot boundary (PEFT's rank_pattern "
        "rule, matched with RE2; repeatable, first match wins).", show_default=False)] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", help=f"What to extract, repeatable: {', '.join(TARGET_GROUPS)} (default all).",
        autocompletion=lambda incomplete: [g for g in TARGET_GROUPS if g.startswith(incomplete)],
        show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="lora_alpha (default: the rank, so scaling 1).",
                                                show_default=False)] = None,
    dtype: Annotated[FactorDtype, typer.Option("--dtype", case_sensitive=False,
                                               help="dtype of the factors.")] = "f32",
    svd: Annotated[SvdMethod, typer.Option("--svd", case_sensitive=False, help="auto: LAPACK's exact SVD for "
                                           "small matrices, randomized (seeded, deterministic) above.")] = "auto",
    name: NameOpt = None,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: BaseModelOpt = None,
    bom: BomOpt = None,
    force: ForceOpt = False,
) -> None:
    """Extract a LoRA adapter from a fine-tune and its base, by truncated SVD per tensor and expert slice."""
    from toolbox.cli.bom_cmd import need_bom, with_boms
    from toolbox.merge.extract_lora import extract_lora as run

    out = ctx.obj
    need_bom(bom)
    res = run(finetune, base, output, rank=rank, rank_pattern=rank_pattern, targets=target, alpha=alpha,
              dtype=dtype, svd=svd, name=name, mau_declaration=mau_declaration, fix_name=fix_name,
              base_model=base_model, force=force, progress=out.progress())
    for w in res.warnings:
        out.warn(w)

    def render(console: Any) -> None:
        from rich.table import Table

        rows = res.tensors if out.verbose or len(res.tensors) <= SHOW_ROWS else sorted(
            res.tensors, key=lambda t: -t.relative_error)[:SHOW_ROWS]
        table = Table(box=None)
        table.add_column("tensor", overflow="fold", min_width=min(max((len(t.name) for t in rows), default=6), 90))
        for col in ("rank", "retained energy", "relative error"):
            table.add_column(col, overflow="fold")
        for t in rows:
            table.add_row(plain(t.name), str(t.rank), f"{t.retained_energy:.4%}", f"{t.relative_error:.3g}")
        console.print(table)
        if len(rows) < len(res.tensors):
            console.print(f"(the {len(rows)} of {len(res.tensors)} tensors with the largest error; --verbose or "
                          "--json for all)")
        console.print(f"wrote {res.path} ({res.name}: {len(res.tensors)} tensors at rank {res.rank}, "
                      f"{res.total.retained:.4%} of the difference's energy retained)", markup=False)

    out.result(*with_boms(out, [res.path], bom, {"finetune": finetune, "base": base, **res.to_dict()}, render))
