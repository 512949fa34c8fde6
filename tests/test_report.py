"""`corral report` without a browser: inputs recognised by content, byte-identical rebuilds, escaping,
the chart files of --format svg|png, the missing-matplotlib install hint, the recipe step's schema.

(tests/test_report_browser.py opens the pages of real command output in Chromium.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolbox.cli.main import main

HOSTILE = "<script>alert(1)</script>&$x^2$\"'.gguf"


def _stats_doc(layers: int = 3, experts: int = 16) -> dict[str, Any]:
    """The shape `corral --json experts stats` prints (RouterStats.to_dict), with seeded numbers."""
    from toolbox.experts.stats import ExpertStats, RouterStats

    rng = np.random.default_rng(0)
    stats = RouterStats("demo:scout", 96, experts, 1)
    for layer in range(layers):
        freq = rng.dirichlet(np.ones(experts))
        stats.layers[layer] = [ExpertStats(layer, e, int(f * 96), float(f), reap=float(rng.random()))
                               for e, f in enumerate(freq)]
    return stats.to_dict()


def _run_doc() -> dict[str, Any]:
    steps = [{"step": "gguf", "uses": "convert", "matrix": {"quant": q}, "label": f"gguf[quant={q}]", "from": "source",
              "status": st, "seconds": s, "output": f"dist/{q}.gguf"}
             for q, st, s in (("q8_0", "built", 4.5), ("f16", "cached", 0.0))]
    steps.append({"step": "license", "uses": "license-check", "label": "license[quant=q8_0]",
                  "from": "gguf[quant=q8_0]", "status": "built", "seconds": 0.25, "output": None})
    return {"recipe": "demo", "dry_run": False, "ok": True, "built": 2, "cached": 1, "steps": steps}


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    """JSON inputs under names that say nothing of what they are."""
    files = {"a.bin": _stats_doc(), "b": _run_doc(),
             "c.txt": [{"file": HOSTILE, "size_bytes": 2**30, "kl_divergence": 0.02, "top1_agreement": 0.95,
                        "perplexity": 9.5}, {"file": "q8.gguf", "size_bytes": 2**31, "kl_divergence": 0.001}]}
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    return [str(tmp_path / n) for n in files]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    capsys.readouterr()
    code = main(["--json", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_inputs_are_recognised_by_content(inputs: list[str]) -> None:
    from toolbox.report.collect import detect_input

    assert [detect_input(Path(p))[0] for p in inputs] == ["experts-stats", "recipe-run", "eval"]


@pytest.mark.parametrize("content", ["just text\n", '{"error": "UsageError", "message": "x"}', "[1, 2]"])
def test_an_unknown_input_is_one_line_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: str) -> None:
    bad = tmp_path / "stats.json"
    bad.write_text(content)
    code, doc, _ = _cli(capsys, "report", str(bad), "-o", str(tmp_path / "r.html"))
    assert code == 3 and doc["error"] == "UnknownInputError" and "\n" not in doc["message"]
    assert not (tmp_path / "r.html").exists()


def test_a_rebuilt_page_is_byte_identical_escaped_and_well_formed(inputs: list[str], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, first, _ = _cli(capsys, "report", *inputs, "-o", str(tmp_path / "one.html"))
    assert code == 0
    assert _cli(capsys, "report", *inputs, "-o", str(tmp_path / "two.html"))[0] == 0
    page = (tmp_path / "one.html").read_text(encoding="utf-8")
    assert page == (tmp_path / "two.html").read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;$x^2$&quot;&#x27;.gguf" in page
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == len(first["charts"]) == 5  # eval, 2 heatmaps, recipe graph and timeline
    ids = []
    for svg in svgs:
        root = ET.fromstring(svg)  # well-formed XML, with no timestamp
        ids += [el.get("id") for el in root.iter() if el.get("id")]
        assert "date" not in svg.lower()
    assert len(ids) == len(set(ids))  # ids unique across the charts of one page
    assert "x^2" in svgs[0]  # the eval chart labels the hostile file as text, not as mathtext
    assert _cli(capsys, "report", *inputs, "-o", str(tmp_path / "one.html"))[0] == 2  # exists, no --force


def test_json_is_the_data_behind_the_charts(inputs: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = _cli(capsys, "report", *inputs, "-o", str(tmp_path / "r.html"))
    stats = _stats_doc()
    heat = doc["data"]["experts"][0]
    assert code == 0 and heat["layers"] == [0, 1, 2]
    for row, layer in zip(heat["frequency"], heat["layers"], strict=True):
        assert row == [e["frequency"] for e in stats["layers"][str(layer)]]
    assert [v["kl_divergence"] for v in doc["data"]["eval"]] == [0.02, 0.001]
    assert [s["seconds"] for s in doc["data"]["recipes"][0]["steps"]] == [4.5, 0.0, 0.25]


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_format_writes_each_chart(inputs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  fmt: str) -> None:
    from PIL import Image

    code, doc, _ = _cli(capsys, "report", *inputs, "--format", fmt, "-o", str(tmp_path / "charts"))
    assert code == 0
    files = sorted((tmp_path / "charts").iterdir())
    assert [f.name for f in files] == sorted(f"{c}.{fmt}" for c in doc["charts"])
    for f in files:
        if fmt == "svg":
            ET.parse(f)
        else:
            img = np.asarray(Image.open(f).convert("L"), dtype=float)
            assert img.shape[0] > 100 and img.std() > 10, f.name


def test_missing_matplotlib_is_exit_2_with_the_install_line(inputs: list[str], tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from toolbox.cli.main import main\n"
            f"sys.exit(main(['--json', 'report', {inputs[0]!r}, '-o', {str(tmp_path / 'r.html')!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert json.loads(res.stdout)["hint"] == "pip install 'corral[report]'"


def test_the_recipe_step_is_in_the_schema(tmp_path: Path) -> None:
    from toolbox.recipe.load import RecipeError, load_recipe

    base = "corral: 1\nname: r\nsource: demo:scout\nsteps:\n  - {id: g, uses: convert, with: {to: gguf}}\n"
    ok = tmp_path / "ok.yaml"
    ok.write_text(base + "  - {id: rep, uses: report, from: g, with: {against: source}, output: r.html}\n")
    step = load_recipe(ok).recipe.steps[1]
    assert step.uses == "report" and step.with_.against == "source"
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + "  - {id: rep, uses: report, from: g, with: {colour: red}}\n")
    with pytest.raises(RecipeError, match="colour"):
        load_recipe(bad)


def test_a_recipe_with_a_report_step_needs_matplotlib_before_it_builds(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("corral: 1\nname: r\nsource: demo:scout\nsteps:\n  - {id: g, uses: convert, with: {to: gguf}}\n"
                      "  - {id: rep, uses: report, from: g, output: r.html}\n")
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from toolbox.cli.main import main\n"
            f"sys.exit(main(['--json', 'recipe', 'validate', {str(recipe)!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert json.loads(res.stdout)["hint"] == "pip install 'corral[report]'"


@pytest.mark.slow
def test_an_artifact_shows_its_signature_and_bom(scout_copy: Path, tmp_path: Path) -> None:
    """Signed with model-signing and described by a CycloneDX BOM: the report says verified, then FAILED
    once a file changes (model-signing's own verdict, through corral verify's library function)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from toolbox.report.collect import collect, signature_status
    from toolbox.supply.bom import build_bom
    from toolbox.supply.sign import sign_artifact

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    build_bom(scout_copy, scout_copy / "bom.cdx.json")
    sign_artifact(scout_copy, priv)
    art = collect([scout_copy], public_key=pub)["artifacts"][0]
    assert art["signature"] == {"file": "model.sig", "status": "verified", "problems": []}
    bom = json.loads((scout_copy / "bom.cdx.json").read_text())
    assert art["bom"]["serial_number"] == bom["serialNumber"] and art["bom"]["spec_version"] == "1.6"
    assert art["license"]["compliant"] and art["stamp"]["name"] == "Llama-4-Scout-demo"
    (scout_copy / "NOTICE").write_text("changed\n")
    sig = signature_status(scout_copy, pub)
    assert sig is not None and sig["status"] == "FAILED" and any("NOTICE" in p for p in sig["problems"])
