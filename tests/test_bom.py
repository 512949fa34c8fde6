"""`corral bom`: CycloneDX 1.6 ML-BOMs. The written document passes cyclonedx-python-lib's own
schema validator (called here, independently), its hashes equal hashlib's SHA-256 of the files, and
its lineage (base repo + revision, adapters, operations) and license are the ones the stamp carries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.validation import make_schemabased_validator
from license_corpus import gguf_file, hf_dir

from license.stamp import LicenseOptions, StampInput, derive_stamp, write_sidecars
from toolbox.cli.main import main
from toolbox.supply.bom import build_bom

BASE = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
REV = "0123456789abcdef0123456789abcdef01234567"
ADAPTER_SHA = "ab" * 32
MERGE = {"op": "merge", "method": "lora", "dtype": "bfloat16",
         "adapters": [{"name": "my-lora", "weight": 0.5, "sha256": ADAPTER_SHA, "peft_version": "0.21.2",
                       "expert_layout": None}]}


def _stamp(name: str = "Llama-4-Scout-merged") -> object:
    src = StampInput("scout", origin={"base_model": BASE, "base_revision": REV,
                                      "sources": {"config.json": "sha256:" + "cd" * 32}})
    first = derive_stamp(src, {"op": "convert", "to": "hf", "dtype": "bf16"},
                         LicenseOptions(name=name, mau_declaration="below-700m"))
    prior = StampInput("scout-hf", prior=first.keys())
    return derive_stamp(prior, MERGE, LicenseOptions(name=name, mau_declaration="below-700m"), relation="merge")


def _validates(text: str) -> None:
    error = make_schemabased_validator(OutputFormat.JSON, SchemaVersion.V1_6).validate_str(text)
    assert error is None, str(error)


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    stamp = _stamp()
    d = hf_dir(tmp_path / "merged", metadata=stamp.safetensors_metadata())
    write_sidecars(d, stamp)
    return d


def test_directory_bom_validates_and_its_hashes_are_the_files(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "bom.cdx.json"
    build_bom(merged, out)
    text = out.read_text(encoding="utf-8")
    _validates(text)
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    model = doc["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["name"] == "Llama-4-Scout-merged"
    listed = {c["name"]: c["hashes"][0] for c in model["components"]}
    on_disk = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in merged.iterdir()}
    assert {"NOTICE", "LICENSE", "README.md", "config.json", "model.safetensors"} <= set(on_disk)
    assert {n: h["content"] for n, h in listed.items()} == on_disk
    assert {h["alg"] for h in listed.values()} == {"SHA-256"}
    assert doc["metadata"]["tools"]["components"][0]["name"] == "corral"


def test_lineage_license_and_declaration_come_from_the_stamp(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "bom.json"
    build_bom(merged, out)
    model = json.loads(out.read_text())["metadata"]["component"]
    lic = model["licenses"][0]["license"]
    assert lic["name"] == "LicenseRef-llama4"
    assert lic["text"]["content"] == (Path(__file__).parents[1] / "license/texts/llama4/LICENSE").read_text()
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["corral:license:mau_declaration"] == "below-700m"
    assert props["corral:base_model:relation"] == "merge"
    ops = [json.loads(props[k]) for k in sorted(props) if k.startswith("corral:operation:")]
    assert [op["op"] for op in ops] == ["convert", "merge"]
    assert ops[1] == MERGE and ops[0]["dtype"] == "bf16"
    ancestors = {a["bom-ref"]: a for a in model["pedigree"]["ancestors"]}
    base = ancestors[f"base:{BASE}"]
    assert base["version"] == REV and base["purl"] == f"pkg:huggingface/meta-llama/Llama-4-Scout-17B-16E-Instruct@{REV}"
    assert base["components"][0]["hashes"][0]["content"] == "cd" * 32
    adapter = next(a for ref, a in ancestors.items() if ref.startswith("adapter:"))
    assert adapter["name"] == "my-lora" and adapter["hashes"][0]["content"] == ADAPTER_SHA
    duties = [c["name"] for c in model["modelCard"]["considerations"]["ethicalConsiderations"]]
    assert "Built with Llama" in duties and any("below-700m" in d for d in duties)


def test_lone_gguf_carries_its_own_hash(tmp_path: Path) -> None:
    stamp = _stamp("Llama-4-Scout-merged-Q8_0")
    path = gguf_file(tmp_path / "m.gguf", stamp.gguf_fields())
    out = tmp_path / "m.cdx.json"
    assert main(["bom", str(path), "-o", str(out)]) == 0
    text = out.read_text()
    _validates(text)
    model = json.loads(text)["metadata"]["component"]
    assert model["hashes"][0]["content"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "components" not in model or not model["components"]
    assert main(["bom", str(path), "-o", str(out)]) == 2  # exists: --force to replace
    assert main(["bom", str(path), "-o", str(out), "--force"]) == 0
    assert main(["bom", str(path), "-o", str(out), "--format", "spdx"]) == 2


def test_unstamped_artifact_is_refused_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    d = hf_dir(tmp_path / "plain")
    out = tmp_path / "bom.json"
    assert main(["bom", str(d), "-o", str(out)]) == 3
    assert "no corral stamp" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_bom_inside_the_artifact_does_not_list_itself_and_is_reproducible(merged: Path) -> None:
    out = merged / "bom.cdx.json"
    build_bom(merged, out)
    first = json.loads(out.read_text())
    assert "bom.cdx.json" not in {c["name"] for c in first["metadata"]["component"]["components"]}
    build_bom(merged, out, force=True)
    again = json.loads(out.read_text())
    assert again["serialNumber"] == first["serialNumber"]
