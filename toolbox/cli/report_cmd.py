"""`corral report`: one self-contained HTML page about artifacts and saved corral JSON (or the charts alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.choices import ReportFormat
from toolbox.cli.options import ForceOpt
from toolbox.cli.output import esc, plural

EPILOG = """\
Inputs are recognised by their content: HF checkpoint directories, .gguf files, ONNX export
directories, a recipe's output directory (its corral-recipe.json and every output it
published), and JSON saved from corral --json verify (with --against: per-tensor error),
experts stats (heatmaps), recipe run (step graph and durations), license check, a CycloneDX
BOM, and eval: {"file", "size_bytes", "kl_divergence", "top1_agreement", "perplexity"} per
variant (one object, a list, or {"variants": [...]}). Anything else is exit 3.

The page has no script and fetches nothing: CSS and SVG charts are inline, and the same
inputs give a byte-identical page. --format svg|png writes one file per chart into the
directory -o; --json prints the data behind the charts. A signature beside an artifact is
verified with --public-key (otherwise reported as present). Needs the report extra
(pip install 'corral[report]': matplotlib).

Exit status: 0 written, 2 usage error (output exists without --force, matplotlib missing),
3 an input corral report does not read.

Examples:

  corral --json verify scout-q4_k_m.gguf --against ./Llama-4-Scout > verify.json

  corral --json experts stats demo:maverick --calibration notes.txt > stats.json

  corral report scout-q4_k_m.gguf verify.json stats.json -o report.html

  corral report dist/ run.json -o dist/report.html --force

  corral report stats.json --format svg -o charts/
"""


def report(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Artifacts (HF/ONNX directories, .gguf files, a recipe's "
                                               "output directory) and saved corral JSON files.", metavar="PATH...",
                                               show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                         help="The HTML file (--format html) or the directory of charts "
                                         "(svg, png); written atomically.")],
    fmt: Annotated[ReportFormat, typer.Option("--format", help="html: one page; svg or png: one file per chart.")]
    = "html",
    public_key: Annotated[Path | None, typer.Option("--public-key", metavar="KEY.pem", show_default=False,
                                                    help="Verify an artifact's signature with this key.")] = None,
    force: ForceOpt = False,
) -> int:
    """Write an HTML report (or its charts) of artifacts, verify/experts/eval/recipe JSON: offline, no script."""
    from toolbox.cli.deps import require

    require("matplotlib")
    if public_key is not None:
        require("model_signing")
    from toolbox.report.build import build_report

    out = ctx.obj
    result = build_report(list(paths), output, fmt=fmt, force=force, public_key=public_key, progress=out.progress())

    def render(console: Console) -> None:
        what = "page" if fmt == "html" else f"{fmt} directory"
        console.print(f"wrote {esc(result.output)} ({what}, {plural(len(result.charts), 'chart')}, "
                      f"{plural(len(result.data['inputs']), 'input')})", highlight=False)

    out.result(result.to_dict(), render)
    return 0
