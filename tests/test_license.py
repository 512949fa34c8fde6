"""The license layer: stamping every format, and an audit that finds seeded violations in
artifacts built directly with safetensors and gguf-py (not only through corral)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from license.audit import check_artifact
from license.policy import load_policy
from license.retrofit import stamp_artifact
from license.stamp import Stamp, fix_name, parse_declaration
from toolbox.cli.main import main
from toolbox.errors import LicensePolicyError

POLICY = load_policy("llama4")
REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llama4"


def test_bundled_texts_are_the_verbatim_reference() -> None:
    for name in ("LICENSE", "USE_POLICY.md"):
        ref = REF / name
        if ref.exists():  # CI and developer machines have ../shared beside the checkout
            assert POLICY.text_bytes(name) == ref.read_bytes()
    assert POLICY.notice in POLICY.text_bytes("LICENSE").decode()
    assert "700 million monthly active users" in POLICY.text_bytes("LICENSE").decode()
    assert POLICY.multimodal_restriction.split(",")[0] in POLICY.text_bytes("USE_POLICY.md").decode()


def test_declarations_and_names(monkeypatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    assert parse_declaration("below-700m") == "below-700m"
    assert parse_declaration("meta-license:ACME-1") == "meta-license:ACME-1"
    for bad in (None, "", "above-700m", "meta-license:"):
        with pytest.raises(LicensePolicyError):
            parse_declaration(bad)
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "below-700m")
    assert parse_declaration(None) == "below-700m"
    assert fix_name("my-scout-ft") == "Llama-my-scout-ft" and fix_name("llama-4-x") == "Llama-4-x"
    with pytest.raises(LicensePolicyError, match="Llama-my-ft"):
        Stamp.create("my-ft", declaration="below-700m")


def _hf_dir(d: Path, *, multimodal: bool = True) -> Path:
    """A tiny Llama 4-looking HF directory written with safetensors directly."""
    d.mkdir(parents=True)
    arch = "Llama4ForConditionalGeneration" if multimodal else "Llama4ForCausalLM"
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama4"}))
    tensors = {"language_model.model.layers.0.feed_forward.router.weight": torch.ones(4, 8)}
    if multimodal:
        tensors["vision_model.class_embedding"] = torch.ones(8)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture
def compliant(tmp_path: Path) -> Path:
    d = _hf_dir(tmp_path / "Llama-4-ok")
    stamp_artifact(d, Stamp.create("Llama-4-ok", declaration="below-700m", multimodal=True,
                                   base_model="meta-llama/Llama-4-Scout-17B-16E-Instruct", relation="finetune"))
    return d


def test_stamped_hf_dir_is_compliant_and_readable_by_the_field(compliant: Path) -> None:
    report = check_artifact(compliant)
    assert report.is_llama and report.findings == []
    card = ModelCard.load(compliant / "README.md")
    assert card.data.license == "other" and card.data.license_name == "llama4"
    assert card.data.base_model == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert card.data.base_model_relation == "finetune"
    assert "**Built with Llama**" in card.text and "European Union" in card.text
    with safe_open(str(compliant / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("vision_model.class_embedding"), torch.ones(8))
    assert meta["corral.license.notice"] == POLICY.notice and meta["corral.model.name"] == "Llama-4-ok"
    assert meta["corral.license.mau_declaration"] == "below-700m"
    assert (compliant / "NOTICE").read_text().strip() == POLICY.notice


def _seed(d: Path, violation: str) -> None:
    if violation == "notice-altered":
        (d / "NOTICE").write_text("Llama 4 is licensed under some license.\n")
    elif violation == "license-missing":
        (d / "LICENSE").unlink()
    elif violation == "policy-altered":
        (d / "USE_POLICY.md").write_text("be nice\n")
    elif violation == "card-no-attribution":
        text = (d / "README.md").read_text().replace("Built with Llama", "Made by us")
        (d / "README.md").write_text(text)
    elif violation == "card-name":
        (d / "README.md").write_text((d / "README.md").read_text().replace("# Llama-4-ok", "# SuperModel"))
    elif violation == "relabelled":
        text = (d / "README.md").read_text().replace("license: other", "license: apache-2.0")
        (d / "README.md").write_text(text.replace("license_name: llama4\n", ""))
    elif violation in ("no-metadata", "no-declaration", "no-eu-clause"):
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata()
        if violation == "no-metadata":
            meta = {"format": "pt"}
        elif violation == "no-declaration":
            meta.pop("corral.license.mau_declaration")
        else:
            meta.pop("corral.license.multimodal_restriction")
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)
    elif violation == "metadata-mismatch":
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = {**f.metadata(), "corral.model.name": "Llama-4-other"}
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)


@pytest.mark.parametrize(
    ("violation", "code"),
    [
        ("notice-altered", "license.notice-altered"),
        ("license-missing", "license.text-missing"),
        ("policy-altered", "license.text-altered"),
        ("card-no-attribution", "license.attribution"),
        ("card-name", "license.name"),
        ("relabelled", "license.relabelled"),
        ("no-metadata", "license.metadata-missing"),
        ("no-declaration", "license.mau-declaration-missing"),
        ("no-eu-clause", "license.multimodal"),
        ("metadata-mismatch", "license.metadata-mismatch"),
    ],
)
def test_audit_finds_each_seeded_violation(compliant: Path, violation: str, code: str) -> None:
    _seed(compliant, violation)
    report = check_artifact(compliant)
    assert code in {f.code for f in report.findings}, report.findings
    assert all(f.clause and f.fix for f in report.findings)


def test_unstamped_llama_dir_and_non_llama_dir(tmp_path: Path) -> None:
    bare = _hf_dir(tmp_path / "bare")
    codes = {f.code for f in check_artifact(bare).findings}
    assert {"license.notice-missing", "license.text-missing", "license.card-missing",
            "license.metadata-missing"} <= codes
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    save_file({"w": torch.ones(2)}, str(other / "model.safetensors"))
    report = check_artifact(other)
    assert not report.is_llama and report.ok


def _gguf(path: Path, **kv: str) -> Path:
    w = gguf.GGUFWriter(path, "llama4")
    for k, v in kv.items():
        w.add_string(k, v)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.ones((2, 4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_audit_and_retrofit(tmp_path: Path) -> None:
    relabelled = _gguf(tmp_path / "r.gguf", **{"general.license": "mit", "general.name": "Scout"})
    codes = {f.code for f in check_artifact(relabelled).findings}
    assert {"license.relabelled", "license.name", "license.metadata-notice", "license.attribution",
            "license.mau-declaration-missing"} <= codes
    stamp_artifact(relabelled, Stamp.create("Scout", fix=True, declaration="meta-license:ACME-7"))
    assert check_artifact(relabelled).findings == []
    r = gguf.GGUFReader(relabelled)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.license"] == "llama4" and fields["general.name"] == "Llama-Scout"
    assert fields["corral.license.mau_declaration"] == "meta-license:ACME-7"
    assert np.array_equal(r.tensors[0].data, np.ones((2, 4, 8), dtype=np.float32))


def test_cli_check_formats_and_exit_codes(compliant: Path, tmp_path: Path, capsys) -> None:
    assert main(["license", "check", str(compliant)]) == 0
    capsys.readouterr()
    _seed(compliant, "notice-altered")
    assert main(["license", "check", str(compliant), "--format", "sarif"]) == 1
    sarif = json.loads(capsys.readouterr().out)
    assert sarif["version"] == "2.1.0"
    run = sarif["runs"][0]
    assert run["tool"]["driver"]["name"] == "corral"
    assert {r["ruleId"] for r in run["results"]} == {"license.notice-altered"}
    assert run["results"][0]["ruleId"] in {rule["id"] for rule in run["tool"]["driver"]["rules"]}
    assert main(["--json", "license", "check", str(compliant)]) == 1
    assert json.loads(capsys.readouterr().out)["compliant"] is False


def test_cli_refusals_exit_5_and_write_nothing(scout_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    out = tmp_path / "x.gguf"
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(out)]) == 5
    assert "700M monthly-active-user threshold" in capsys.readouterr().err
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(out), "--name", "scout-ft",
                 "--mau-declaration", "below-700m"]) == 5
    assert "Llama-scout-ft" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    copy = tmp_path / "c"
    shutil.copytree(scout_dir, copy)
    before = (copy / "model-00001-of-00002.safetensors").read_bytes()
    assert main(["license", "stamp", str(copy), "--name", "bad-name"]) == 5
    assert (copy / "model-00001-of-00002.safetensors").read_bytes() == before


def test_converted_gguf_is_compliant(scout_dir: Path, tmp_path: Path) -> None:
    from converters.hf_to_gguf import convert_hf_to_gguf

    out = tmp_path / "m.gguf"
    convert_hf_to_gguf(scout_dir, out, outtype="q8_0", mau_declaration="below-700m",
                       base_model="meta-llama/Llama-4-Scout-17B-16E-Instruct")
    report = check_artifact(out)
    assert report.is_llama and report.findings == []
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["general.base_model.0.organization"] == "meta-llama"
    assert json.loads(fields["corral.provenance"])["operations"][0]["outtype"] == "Q8_0"
