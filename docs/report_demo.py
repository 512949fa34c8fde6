"""Rebuild docs/report-demo.png: the `corral report` page of the demo artifacts, screenshotted in Chromium.

    python docs/report_demo.py [WORKDIR]

Inputs, all made here by corral itself: a recipe run (demo:scout -> q8_0 GGUF, with a `uses: report` step),
`verify --against` of that GGUF, `experts stats` of demo:maverick, a pruned Maverick (kept experts marked on
the heatmaps), and an eval file per GGUF variant (q8_0, q4_k_m, q2_k) in the shape `corral report` reads:
each variant dequantized back to HF and measured with `corral experts compare` (KL, top-1, perplexity).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
corral: 1
name: report-demo
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - {id: gguf, uses: convert, with: {to: gguf, outtype: q8_0}, output: "{model}-q8_0.gguf"}
  - {id: report, uses: report, from: gguf, with: {against: source}, output: "{model}-q8_0.report.html"}
"""


def corral(*args: str) -> dict:
    from toolbox.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--json", "--no-progress", *args])
    if code != 0:
        raise SystemExit(f"corral {' '.join(args)}: exit {code}\n{buf.getvalue()[-2000:]}")
    return json.loads(buf.getvalue())


def main(work: Path) -> None:
    os.environ.setdefault("CORRAL_MAU_DECLARATION", "below-700m")
    (work / "recipe.yaml").write_text(RECIPE)
    (work / "calib.txt").write_text("The router sends each token to one expert; Llama 4 has many of them. " * 12)
    (work / "run.json").write_text(json.dumps(corral("recipe", "run", str(work / "recipe.yaml"), "-o",
                                                     str(work / "dist"), "--cache-dir", str(work / "cache"))))
    gguf = work / "dist" / "Llama-4-Scout-demo-q8_0.gguf"
    (work / "verify.json").write_text(json.dumps(corral("verify", str(gguf), "--against", "demo:scout")))
    (work / "stats.json").write_text(json.dumps(corral("experts", "stats", "demo:maverick", "--calibration",
                                                       str(work / "calib.txt"), "--max-tokens", "256")))
    corral("experts", "prune", "demo:maverick", "--keep", "0-63", "-o", str(work / "Llama-4-Maverick-demo-64E"))
    variants = []
    for quant in ("q8_0", "q4_k_m", "q2_k"):
        file = work / f"Llama-4-Scout-demo-{quant}.gguf"
        corral("convert", "demo:scout", "--to", "gguf", "--outtype", quant, "-o", str(file))
        corral("convert", str(file), "--to", "hf", "-o", str(work / f"hf-{quant}"))
        cmp = corral("experts", "compare", "demo:scout", str(work / f"hf-{quant}"), "--calibration",
                     str(work / "calib.txt"), "--max-tokens", "256")
        variants.append({"file": file.name, "size_bytes": file.stat().st_size, "kl_divergence": cmp["kl"],
                         "top1_agreement": cmp["top1_agreement"], "perplexity": cmp["perplexity_other"]})
    (work / "eval.json").write_text(json.dumps(variants))
    page = work / "report.html"
    os.chdir(work)  # the page names its inputs as given: short relative names
    corral("report", "dist", "run.json", "verify.json", "stats.json", "eval.json", "Llama-4-Maverick-demo-64E",
           "-o", str(page))
    screenshot(page, REPO / "docs" / "report-demo.png")


def screenshot(page: Path, out: Path) -> None:
    """The quantization and expert sections at 1200 px, scaled to 900 px wide."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.goto(page.resolve().as_uri())
        top = tab.eval_on_selector("#quantization", "e => e.getBoundingClientRect().top + window.scrollY")
        bottom = tab.eval_on_selector("#experts-reap-0", "e => e.getBoundingClientRect().top + window.scrollY")
        png = tab.screenshot(full_page=True)
        browser.close()
    img = Image.open(io.BytesIO(png)).convert("RGB").crop((0, int(top) - 8, 1200, int(bottom)))
    img = img.resize((900, round(img.height * 900 / 1200)), Image.Resampling.LANCZOS)
    img.save(out, optimize=True)
    print(f"{out}: {out.stat().st_size} bytes, {img.width}x{img.height}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
