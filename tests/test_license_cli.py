"""`corral license check|stamp` through the CLI boundary: exit codes 0/1/2/3/5, the three
output formats (SARIF validated against the 2.1.0 schema's object model), refusals that write
nothing, and a start-up that imports none of the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from license_corpus import BASE, POLICY, gguf_file, hf_compliant_by_hand, hf_dir, snapshot, write_texts

from toolbox.cli.main import main


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def test_check_exit_codes_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = hf_compliant_by_hand(tmp_path / "hf")
    assert main(["license", "check", str(d)]) == 0
    assert "COMPLIANT" in capsys.readouterr().out
    (d / "NOTICE").write_text("Llama 4 is licensed.\n")
    assert main(["license", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "notice-altered" in out and "1.b.iii" in out and "fix:" in out
    assert main(["license", "check", str(tmp_path / "nowhere")]) == 3
    assert "no such file" in capsys.readouterr().err
    assert main(["license", "check", str(d), "--format", "xml"]) == 2


def test_check_json_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = gguf_file(tmp_path / "m.gguf", {"general.name": "scout", "general.license": "mit"})
    for argv in (["license", "check", str(path), "--format", "json"], ["--json", "license", "check", str(path)]):
        assert main(argv) == 1
        doc = json.loads(capsys.readouterr().out)
        assert doc["compliant"] is False and doc["policy"] == "llama4" and doc["kind"] == "gguf"
        assert {"relabelled", "name-prefix", "declaration-missing"} <= {f["code"] for f in doc["findings"]}
        assert doc["recognised_by"] == ["m.gguf: GGUF general.architecture llama4"]


def test_check_sarif_is_valid_2_1_0(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = hf_compliant_by_hand(tmp_path / "hf")
    (d / "NOTICE").unlink()
    (d / "README.md").write_text((d / "README.md").read_text().replace("# Llama-4-Scout-handmade", "# scout"))
    monkeypatch.chdir(tmp_path)
    assert main(["license", "check", "hf", "--format", "sarif"]) == 1
    sarif = json.loads(capsys.readouterr().out)
    assert sarif["version"] == "2.1.0" and sarif["$schema"].endswith("sarif-2.1.0.json")
    (run,) = sarif["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert run["tool"]["driver"]["name"] == "corral-license"
    assert [r["id"] for r in rules] == ["notice-missing", "name-prefix"]
    assert rules[1]["properties"]["clause"] == "1.b.i" and rules[0]["defaultConfiguration"]["level"] == "error"
    by_rule = {r["ruleId"]: r for r in run["results"]}
    assert set(by_rule) == {"notice-missing", "name-prefix"}
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"] and result["level"] == "error"
        assert result["message"]["text"] and result["locations"][0]["physicalLocation"]["region"]["startLine"] >= 1
    assert by_rule["notice-missing"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "hf/NOTICE"
    title = by_rule["name-prefix"]["locations"][0]["physicalLocation"]
    assert title["artifactLocation"]["uri"] == "hf/README.md"
    assert (d / "README.md").read_text().splitlines()[title["region"]["startLine"] - 1] == "# scout"
    try:
        from pydantic_sarif.model import StaticAnalysisResultsFormatSarifVersion210JsonSchema as SarifLog
    except ImportError:  # pragma: no cover - optional test dependency (pip install pydantic-sarif)
        return
    SarifLog.model_validate(sarif)  # the schema's object model, extra fields forbidden


def test_sarif_of_a_compliant_artifact_has_no_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["license", "check", str(hf_compliant_by_hand(tmp_path / "hf")), "--format", "sarif"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["results"] == [] and run["tool"]["driver"]["rules"] == []


def test_stamp_refusals_exit_5_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = hf_dir(tmp_path / "my-scout-ft")
    before = snapshot(tmp_path)
    assert main(["license", "stamp", str(d), "--mau-declaration", "below-700m"]) == 5
    err = capsys.readouterr().err
    assert "'my-scout-ft' does not begin with 'Llama'" in err and "--name Llama-my-scout-ft" in err
    assert main(["license", "stamp", str(d), "--name", "Llama-4-ok"]) == 5
    assert "--mau-declaration below-700m" in capsys.readouterr().err
    assert main(["license", "stamp", str(d), "--name", "Llama-4-ok", "--mau-declaration", "above-700m"]) == 5
    assert main(["--json", "license", "stamp", str(d), "--name", "scout", "--mau-declaration", "below-700m"]) == 5
    assert json.loads(capsys.readouterr().out)["exit_code"] == 5
    assert main(["license", "stamp", str(d), "--name", "Llama-x", "--mau-declaration", "below-700m",
                 "--relation", "distilled"]) == 2
    assert snapshot(tmp_path) == before


def test_stamp_then_check_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d = hf_dir(tmp_path / "my-scout-ft")
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "meta-license:ACME-2025-17")
    assert main(["--json", "license", "stamp", str(d), "--fix-name", "--base-model", BASE,
                 "--relation", "finetune"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "Llama-my-scout-ft" and doc["declaration"] == "meta-license:ACME-2025-17"
    assert doc["multimodal"] is True and {Path(p).name for p in doc["written"]} == {
        "model.safetensors", "NOTICE", "LICENSE", "USE_POLICY.md", "README.md"}
    assert main(["license", "check", str(d)]) == 0
    capsys.readouterr()
    # a second stamp keeps the name now recorded in the artifact, no --fix-name needed
    assert main(["license", "stamp", str(d), "--mau-declaration", "below-700m"]) == 0
    assert "Llama-my-scout-ft" in capsys.readouterr().out


def test_stamp_over_another_license_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = hf_dir(tmp_path / "Llama-4-x")
    write_texts(d, "Llama-4-x", multimodal=True, license="apache-2.0", license_name=None)
    args = ["license", "stamp", str(d), "--mau-declaration", "below-700m"]
    assert main(args) == 2
    assert "README.md license: apache-2.0" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert main(["license", "check", str(d)]) == 0
    assert (d / "LICENSE").read_bytes() == POLICY.text_bytes("LICENSE")


@pytest.mark.parametrize("command", ["check", "stamp"])
def test_help_has_runnable_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["license", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples" in out and f"corral license {command} " in out


def test_startup_imports_nothing_heavy() -> None:
    code = ("import sys, toolbox.cli.app; heavy = [m for m in ('huggingface_hub', 'gguf', 'onnx', 'pydantic', "
            "'license.stamp', 'torch', 'numpy') if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.strip() == "[]"
