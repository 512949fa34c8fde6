"""`corral verify`: structural and tokenizer checks, findings with stable codes."""

from __future__ import annotations

from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.options import CheckpointArg
from toolbox.cli.output import esc, plural

EPILOG = """\
Exit status: 0 clean (info findings only), 1 errors or warnings found,
3 a file could not be read at all (fatal findings).

Examples:

  corral verify demo:maverick

  corral verify ./Llama-4-Scout-17B-16E-Instruct --deep

  corral verify scout-q8_0.gguf --against ./Llama-4-Scout-17B-16E-Instruct

  corral verify ./scout-onnx --run

  corral --json verify ./merged | jq '.findings[] | select(.severity != "info")'
"""

_STYLE = {"fatal": "bold red", "error": "red", "warning": "yellow", "info": "dim"}


def verify(
    ctx: typer.Context,
    path: CheckpointArg,
    deep: Annotated[bool, typer.Option("--deep", help="Read every byte: NaN/Inf counts and per-tensor statistics.")]
    = False,
    against: Annotated[str | None, typer.Option("--against", metavar="HF_DIR", show_default=False,
                                                help="GGUF only: compare every tensor with this HF checkpoint "
                                                "(dequantized; bit-exact for lossless types, a tolerance per "
                                                "quant type otherwise).")] = None,
    run: Annotated[bool, typer.Option("--run", help="ONNX only: greedy-decode a few tokens in onnxruntime and "
                                      "in transformers (weights recovered from the export) and compare.")] = False,
) -> int:
    """Check that every tensor the config implies is present with the right shape and dtype,
    that index and shard headers agree, that the config is consistent and that the tokenizer
    matches the model (special ids, round trip, Llama 4 fingerprint)."""
    from toolbox.verify.checks import verify_checkpoint

    out = ctx.obj
    if run:
        from toolbox.cli.deps import require

        require("onnxruntime")
    report = verify_checkpoint(path, deep=deep, against=against, run=run, progress=out.progress())

    def render(console: Console) -> None:
        for f in report.findings:
            where = f" [{f.tensor}]" if f.tensor and f.tensor not in f.message else ""
            style = _STYLE[f.severity]
            console.print(f"[{style}]{f.severity:7}[/{style}] {esc(f.code):24} {esc(f.message + where)}",
                          highlight=False)
        counts = {s: sum(1 for f in report.findings if f.severity == s) for s in _STYLE}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
        verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
        checked = report.checked
        counted = [plural(checked[k], k[:-1]) for k in ("tensors", "shards") if isinstance(checked.get(k), int)]
        what = f"{' in '.join(counted)} checked" if counted else "not readable"
        console.print(f"{verdict} {esc(report.path)}: {what}; {summary}", highlight=False)

    out.result(report.to_dict(), render)
    return int(report.exit_code)
