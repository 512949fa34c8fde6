"""`corral bom --format spdx3`: SPDX 3.0.1 JSON-LD with the AI profile. The document is read with the SPDX
project's own bindings (spdx-python-model's JSON-LD deserializer), every reference resolves, the AI profile's
conformance rules hold, the files' hashes are hashlib's SHA-256, and the lineage, license and MAU declaration
are the stamp's."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from license_corpus import gguf_file, hf_dir
from spdx_python_model import v3_0_1 as spdx3

from license.stamp import LicenseOptions, StampInput, derive_stamp, write_sidecars
from toolbox.cli.main import main
from toolbox.supply.bom import build_bom

BASE = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
REV = "0123456789abcdef0123456789abcdef01234567"
ADAPTER_SHA = "ab" * 32
MERGE = {"op": "merge", "method": "lora", "dtype": "bfloat16",
         "adapters": [{"name": "my-lora", "weight": 0.5, "sha256": ADAPTER_SHA}]}
INDIVIDUALS = {*spdx3.IndividualElement.NAMED_INDIVIDUALS.values(),
               *spdx3.expandedlicensing_IndividualLicensingInfo.NAMED_INDIVIDUALS.values()}


def _stamp(name: str = "Llama-4-Scout-merged") -> object:
    src = StampInput("scout", origin={"base_model": BASE, "base_revision": REV})
    first = derive_stamp(src, {"op": "convert", "to": "hf", "dtype": "bf16"},
                         LicenseOptions(name=name, mau_declaration="below-700m"))
    prior = StampInput("scout-hf", prior=first.keys())
    return derive_stamp(prior, MERGE, LicenseOptions(name=name, mau_declaration="below-700m"), relation="merge")


def _read(path: Path) -> spdx3.SHACLObjectSet:
    objects = spdx3.SHACLObjectSet()
    spdx3.JSONLDDeserializer().read(io.StringIO(path.read_text(encoding="utf-8")), objects)
    assert objects.link() <= INDIVIDUALS  # every other reference is an element of the document
    return objects


def _relations(objects: spdx3.SHACLObjectSet, source: object, kind: str) -> list[object]:
    want = getattr(spdx3.RelationshipType, kind)
    return [r for r in objects.foreach_type(spdx3.Relationship) if r.from_ is source and r.relationshipType == want]


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    stamp = _stamp()
    d = hf_dir(tmp_path / "merged", metadata=stamp.safetensors_metadata())
    write_sidecars(d, stamp)
    return d


def test_directory_document_reads_back_with_the_ai_profile(merged: Path) -> None:
    out = merged / "bom.spdx3.json"
    result = build_bom(merged, out, fmt="spdx3")
    assert result.format == "spdx-3.0.1"
    objects = _read(out)
    (doc,) = objects.foreach_type(spdx3.SpdxDocument)
    (model,) = objects.foreach_type(spdx3.ai_AIPackage)
    assert list(doc.rootElement) == [model] and model.name == "Llama-4-Scout-merged"
    assert {str(p) for p in doc.profileConformance} >= {spdx3.ProfileIdentifierType.ai,
                                                         spdx3.ProfileIdentifierType.core}
    assert model.software_primaryPurpose == spdx3.software_SoftwarePurpose.model
    # the AI profile: a supplier, download location, version, purpose and release time on every AIPackage,
    # exactly one declared and one concluded license
    assert model.suppliedBy and model.software_downloadLocation and model.software_packageVersion
    assert model.releaseTime is not None
    assert len(_relations(objects, model, "hasConcludedLicense")) == 1
    (declared,) = _relations(objects, model, "hasDeclaredLicense")
    (expr,) = declared.to
    assert expr.simplelicensing_licenseExpression == "LicenseRef-llama4"
    (entry,) = expr.simplelicensing_customIdToUri
    text = objects.find_by_id(entry.value)
    assert entry.key == "LicenseRef-llama4"
    assert text.simplelicensing_licenseText == (merged / "LICENSE").read_text(encoding="utf-8")
    (contains,) = _relations(objects, model, "contains")
    listed = {f.name: f.verifiedUsing[0].hashValue for f in contains.to}
    assert {f.verifiedUsing[0].algorithm for f in contains.to} == {spdx3.HashAlgorithm.sha256}
    on_disk = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in merged.iterdir() if f != out}
    assert {"NOTICE", "LICENSE", "README.md", "config.json", "model.safetensors"} <= set(on_disk)
    assert listed == on_disk
    statements = {a.statement for a in objects.foreach_type(spdx3.Annotation) if a.subject is model}
    assert "corral.license.mau_declaration=below-700m" in statements


def test_lineage_base_adapters_and_one_build_per_operation(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.spdx3.json"
    build_bom(merged, out, fmt="spdx3")
    objects = _read(out)
    (model,) = objects.foreach_type(spdx3.ai_AIPackage)
    (desc,) = _relations(objects, model, "descendantOf")
    by_name = {p.name: p for p in desc.to}
    base = by_name[BASE]
    assert base.software_packageVersion == REV
    assert base.software_packageUrl == f"pkg:huggingface/meta-llama/Llama-4-Scout-17B-16E-Instruct@{REV}"
    assert by_name["my-lora"].verifiedUsing[0].hashValue == ADAPTER_SHA
    builds = sorted(objects.foreach_type(spdx3.build_Build), key=lambda b: b.build_buildId)
    assert [b.build_buildType for b in builds] == ["urn:corral:operation:convert", "urn:corral:operation:merge"]
    params = {e.key: json.loads(e.value) for e in builds[1].build_parameter}
    assert params == MERGE
    assert [r.to[0] for r in _relations(objects, builds[1], "hasOutput")] == [model]
    assert list(_relations(objects, builds[1], "hasInput")[0].to) == [by_name["my-lora"]]
    build_bom(merged, out, fmt="spdx3", force=True)  # the same artifact: the same bytes
    assert out.read_bytes() == (tmp_path / "m.spdx3.json").read_bytes()


def test_lone_gguf_via_the_cli_and_license_check_cross_checks_it(tmp_path: Path) -> None:
    stamp = _stamp("Llama-4-Scout-merged-Q8_0")
    path = gguf_file(tmp_path / "m.gguf", stamp.gguf_fields())
    out = tmp_path / "m.gguf.spdx3.json"
    assert main(["bom", str(path), "--format", "spdx3", "-o", str(out)]) == 0
    objects = _read(out)
    (model,) = objects.foreach_type(spdx3.ai_AIPackage)
    assert model.verifiedUsing[0].hashValue == hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["license", "check", str(path), "--hashes"]) == 0
    doc = json.loads(out.read_text())
    for e in doc["@graph"]:
        if e.get("statement") == "corral.license.mau_declaration=below-700m":
            e["statement"] = "corral.license.mau_declaration=meta-license:other"
    out.write_text(json.dumps(doc))
    assert main(["license", "check", str(path)]) == 1  # the BOM no longer repeats the stamp
