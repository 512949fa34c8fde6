"""`corral report` pages opened in a real browser: Debian's headless Chromium, driven by Playwright.

The inputs are the demo artifacts and the JSON the commands themselves print (a recipe run with a
`uses: report` step, `verify --against`, `experts stats`, a pruned Maverick, an eval file in the
documented shape). The page must load with no console error and no request leaving it, show every chart
with a non-zero size, render something (the screenshot is not blank), and show the same numbers as the
JSON of the commands they came from.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from toolbox.cli.main import main

pytestmark = pytest.mark.slow

RECIPE = """\
corral: 1
name: report-demo
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - {id: gguf, uses: convert, with: {to: gguf, outtype: q8_0}, output: "{model}-q8_0.gguf"}
  - {id: verify, uses: verify, from: gguf}
  - {id: report, uses: report, from: gguf, with: {against: source}, output: "{model}-q8_0.report.html"}
"""
HOSTILE = '<img src=x onerror="fetch(\'http://example.invalid/\')">$\\alpha$.gguf'


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every input, the command JSON each came from, and the report of them all."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "recipe.yaml").write_text(RECIPE)
    (tmp / "calib.txt").write_text("The router sends each token to one expert. Llama 4 has many of them. " * 8)
    docs: dict[str, Any] = {}

    def run(name: str, *args: str) -> Path:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["--json", "--no-progress", *args])
        assert code == 0, buf.getvalue()[-2000:]
        docs[name] = json.loads(buf.getvalue())
        (tmp / f"{name}.json").write_text(buf.getvalue())
        return tmp / f"{name}.json"

    run("run", "recipe", "run", str(tmp / "recipe.yaml"), "-o", str(tmp / "dist"), "--cache-dir", str(tmp / "cache"))
    gguf = tmp / "dist" / "Llama-4-Scout-demo-q8_0.gguf"
    run("verify", "verify", str(gguf), "--against", "demo:scout")
    run("stats", "experts", "stats", "demo:maverick", "--calibration", str(tmp / "calib.txt"), "--max-tokens", "64")
    run("prune", "experts", "prune", "demo:maverick", "--keep", "0-63", "-o", str(tmp / "pruned"),
        "--mau-declaration", "below-700m")
    run("inspect_pruned", "inspect", str(tmp / "pruned"))
    run("inspect_gguf", "inspect", str(gguf))
    run("license_gguf", "license", "check", str(gguf))
    docs["eval"] = [{"file": "scout-q8_0.gguf", "size_bytes": 41209856, "kl_divergence": 0.00123,
                     "top1_agreement": 0.991, "perplexity": 12.5},
                    {"file": HOSTILE, "size_bytes": 23000000, "kl_divergence": 0.0417, "top1_agreement": 0.93,
                     "perplexity": 13.9}]
    (tmp / "eval.json").write_text(json.dumps(docs["eval"]))
    inputs = [str(tmp / "dist"), str(tmp / "run.json"), str(tmp / "verify.json"), str(tmp / "stats.json"),
              str(tmp / "eval.json"), str(tmp / "pruned")]
    run("report", "report", *inputs, "-o", str(tmp / "report.html"))
    return {"tmp": tmp, "docs": docs, "page": tmp / "report.html", "step_page": tmp / "dist" /
            "Llama-4-Scout-demo-q8_0.report.html"}


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed (apt-get install -y chromium; .ci/run installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser: Any, page_file: Path) -> tuple[Any, list[str], list[str], Any]:
    """The loaded page, its console errors and every request it made; all but the page itself are aborted."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: requests.append(r.url))
    url = page_file.resolve().as_uri()
    context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    page.goto(url, wait_until="load")
    return page, errors, requests, context


def _cells(page: Any, table: str, within: str = "") -> list[list[str]]:
    """data-value (or the text) of every cell of the tables of class `table`, row by row, header rows aside."""
    rows = page.eval_on_selector_all(f"{within} table.{table} tr", "rows => rows.map(r => [...r.querySelectorAll('td')]"
                                     ".map(c => c.dataset.value ?? c.textContent))")
    return [r for r in rows if r]


@pytest.mark.parametrize("which", ["page", "step_page"])
def test_the_page_loads_offline_with_every_chart_drawn(made: dict[str, Any], browser: Any, which: str) -> None:
    import numpy as np
    from PIL import Image

    page, errors, requests, context = _open(browser, made[which])
    try:
        assert not errors
        assert requests == [made[which].resolve().as_uri()]  # nothing but the page itself
        assert page.eval_on_selector_all("script", "s => s.length") == 0
        figures = page.query_selector_all("figure.chart")
        expected = made["docs"]["report"]["charts"] if which == "page" else ["quant-error-0"]
        assert [f.get_attribute("id") for f in figures] == expected
        for f in figures:
            box = f.query_selector("svg").bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50, f.get_attribute("id")
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"), dtype=float)
        assert shot.shape[0] > 900 and shot.std() > 20  # charts and tables, not a blank page
        assert page.evaluate("document.title") == "corral report"
    finally:
        context.close()


def test_the_numbers_are_the_commands_json(made: dict[str, Any], browser: Any) -> None:
    docs = made["docs"]
    page, _errors, _requests, context = _open(browser, made["page"])
    try:
        ev = _cells(page, "eval")
        assert [r[0] for r in ev] == [v["file"] for v in docs["eval"]]  # the hostile name shown as text
        for row, v in zip(ev, docs["eval"], strict=True):
            assert [float(x) for x in row[1:]] == [v["size_bytes"], v["kl_divergence"], v["top1_agreement"],
                                                   v["perplexity"]]
        against = docs["verify"]["checked"]["against"]
        quant = _cells(page, "quant")
        assert sum(int(r[1]) for r in quant) == against["tensors_compared"] == len(docs["verify"]["tensor_stats"])
        assert max(float(r[3]) for r in quant) == against["worst"]["rel_rms_error"]
        layers = docs["stats"]["layers"]
        most = _cells(page, "experts")
        assert [int(r[0]) for r in most] == sorted(int(k) for k in layers)
        for row in most:
            freqs = [e["frequency"] for e in layers[row[0]]]
            assert float(row[2]) == max(freqs) and freqs[int(row[1])] == max(freqs)
        steps = {s["label"]: s for s in docs["run"]["steps"]}
        recipe = _cells(page, "recipe", "div[data-path$='run.json']")
        assert [r[0] for r in recipe] == list(steps)
        for r in recipe:
            assert r[2] == steps[r[0]]["status"] and float(r[3]) == steps[r[0]]["seconds"]
        cards = page.inner_text("#artifacts")
        assert str(docs["inspect_pruned"]["parameters"]["total"]) in cards
        assert str(docs["inspect_gguf"]["bytes"]) in cards
        assert docs["license_gguf"]["compliant"] and "compliant" in cards
        assert "pruned (dropped)" in page.inner_text("#experts-frequency-0")  # kept experts from the provenance
        assert "Built with Llama" in page.inner_text("footer")
    finally:
        context.close()


def test_the_recipe_step_rebuilds_the_page_byte_identical_under_the_lock(made: dict[str, Any]) -> None:
    """The published page holds no cache path and no time: rebuilt from scratch, it meets the lock."""
    tmp = made["tmp"]
    args = ["--json", "--no-progress", "recipe", "run", str(tmp / "recipe.yaml"), "-o", str(tmp / "dist2"),
            "--cache-dir", str(tmp / "cache"), "--lock", str(tmp / "recipe.lock")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0  # everything cached: the lock records the page's hash
    key = next(s["key"] for s in made["docs"]["run"]["steps"] if s["uses"] == "report")
    obj = tmp / "cache" / "objects" / key
    for p in [obj, *obj.rglob("*")]:
        p.chmod(0o755)
    shutil.rmtree(obj)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0, buf.getvalue()[-2000:]  # a differing rebuild is a ReproducibilityError (exit 3)
    assert {s["label"]: s["status"] for s in json.loads(buf.getvalue())["steps"]}["report"] == "built"
    page = (tmp / "dist2" / "Llama-4-Scout-demo-q8_0.report.html").read_bytes()
    assert page == made["step_page"].read_bytes()
    assert str(tmp).encode() not in page and b"/.cache" not in page
