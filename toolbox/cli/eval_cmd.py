"""`corral eval`: measured quality of GGUF files against their HF source (or its BF16/F32 GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from toolbox.cli._typer import typer

if TYPE_CHECKING:
    from rich.console import Console

EPILOG = """\
Each GGUF runs in llama.cpp (llama-cpp-python, logits of every position); the source runs in
transformers, one decoder layer at a time in float32, or, when --against names a .gguf (the BF16 or
F32 GGUF of the source), in llama.cpp too, tokenized by that file's vocabulary. The source's logits
are computed once for all files, into a temporary file under $TMPDIR (positions x vocabulary x 4
bytes: 3.3 GB for 8 chunks of 512 tokens at Llama 4's vocabulary). The text is cut into --chunks
chunks of --ctx tokens, each starting with BOS. Reported per file: KL(source || gguf) of the next-token
distributions (mean and 99th percentile, nats), top-1 agreement, and the perplexity of the text
under the GGUF and under the source. --json: {"variants": [{"file", "size_bytes", "outtype",
"kl_divergence": {"mean", "p99"}, "top1_agreement", "perplexity", "source_perplexity"}, ...],
"source", "tokens"}.

Examples:

  corral eval scout-q4_k_m.gguf scout-q8_0.gguf --against demo:scout --calibration heldout.txt

  corral --json eval *.gguf --against ./Llama-4-Scout-17B-16E-Instruct --calibration heldout.txt \\
      --ctx 512 --chunks 16 > quality.json

  corral eval scout-q4_k_m.gguf scout-dynamic.gguf --against scout-bf16.gguf --calibration heldout.txt
"""


def eval_gguf(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="GGUF files to measure.", metavar="QUANT.gguf...",
                                                show_default=False)],
    against: Annotated[str, typer.Option(
        "--against", help="The source: an HF checkpoint (or demo:*), or its BF16/F32 .gguf.", show_default=False)],
    calibration: Annotated[Path, typer.Option("--calibration", help="Held-out text (.txt, .jsonl).",
                                              show_default=False)],
    n_ctx: Annotated[int, typer.Option("--ctx", help="Tokens per chunk.")] = 512,
    chunks: Annotated[int, typer.Option("--chunks", help="Chunks of text to score.")] = 8,
    threads: Annotated[int | None, typer.Option("--threads", help="llama.cpp threads (default: all cores).",
                                                show_default=False)] = None,
) -> None:
    """KL divergence, top-1 agreement and perplexity of each GGUF against its source."""
    from toolbox.experts.quality import evaluate_gguf

    out = ctx.obj
    r = evaluate_gguf(files, against, calibration, ctx=n_ctx, chunks=chunks, threads=threads,
                      progress=out.progress())

    def render(c: Console) -> None:
        from rich.table import Table

        from toolbox.cli.output import human_size, plain

        table = Table(title=f"{r.tokens} positions against {r.source}")
        for col in ("file", "type", "size", "KL mean", "KL p99", "top-1", "PPL", "source PPL"):
            table.add_column(col, justify="left" if col == "file" else "right")
        for v in r.variants:
            table.add_row(plain(Path(v.file).name), v.outtype, human_size(v.size_bytes), f"{v.kl_mean:.3g}",
                          f"{v.kl_p99:.3g}", f"{v.top1_agreement:.2%}", f"{v.perplexity:.4g}",
                          f"{v.source_perplexity:.4g}")
        c.print(table)
    out.result(r.to_dict(), render)
