"""The converters stamp what they write (they call `Stamp.create`, `apply_to_gguf_writer`,
`safetensors_metadata` and `write_sidecars`), so their outputs pass the audit as written; and
they refuse, writing nothing, when the license policy does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.tensors.gguf.reader import read_gguf_kv

BASE = "meta-llama/Llama-4-Scout-17B-16E-Instruct"


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


def test_converted_gguf_passes_the_audit(scout_dir: Path, tmp_path: Path) -> None:
    from converters.hf_to_gguf import convert_hf_to_gguf

    out = tmp_path / "m.gguf"
    convert_hf_to_gguf(scout_dir, out, outtype="q8_0", mau_declaration="below-700m", base_model=BASE)
    report = check_artifact(out)
    assert report.is_llama and report.findings == [], report.findings
    fields = read_gguf_kv(out)  # GGUFReader spends ~15 s on the 200k-token vocabulary
    assert fields["general.name"].startswith("Llama-4-") and fields["general.license"] == "llama4"
    assert fields["general.base_model.0.organization"] == "meta-llama"
    assert json.loads(fields["corral.provenance"])["operations"][0]["outtype"] == "Q8_0"


def test_convert_refusals_exit_5_and_write_nothing(scout_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.gguf"
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(out)]) == 5
    assert "--mau-declaration below-700m" in capsys.readouterr().err
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(out), "--name", "scout-ft",
                 "--mau-declaration", "below-700m"]) == 5
    assert "Llama-scout-ft" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_resolves_the_demo_and_it_passes_the_audit(scout_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demos are Llama derivatives (the real tokenizer): they carry the stamp and pass corral's own audit."""
    assert main(["--json", "license", "check", "demo:scout"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(scout_dir) and doc["policy"] == "llama4" and doc["findings"] == []
    assert doc["compliant"] is True and doc["multimodal"] is True
