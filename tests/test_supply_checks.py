"""SPDX 2.3 BOMs (checked by spdx-tools' own parser and validator, hashes against hashlib) and
`license check` reading a signature and a BOM beside an artifact (model-signing makes the signature)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from license_corpus import hf_dir

from license.audit import check_artifact
from license.stamp import LicenseOptions, StampInput, derive_stamp, write_sidecars
from toolbox.cli.main import main
from toolbox.supply.bom import build_bom

BASE = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
REV = "0123456789abcdef0123456789abcdef01234567"
ADAPTER_SHA = "ab" * 32


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    src = StampInput("scout", origin={"base_model": BASE, "base_revision": REV})
    opts = LicenseOptions(name="Llama-4-Scout-merged", mau_declaration="below-700m")
    first = derive_stamp(src, {"op": "convert", "to": "hf"}, opts)
    stamp = derive_stamp(StampInput("scout-hf", prior=first.keys()),
                         {"op": "merge", "adapters": [{"name": "my-lora", "weight": 0.5, "sha256": ADAPTER_SHA}]},
                         opts, relation="merge")
    d = hf_dir(tmp_path / "merged", multimodal=False, metadata=stamp.safetensors_metadata())
    write_sidecars(d, stamp)
    return d


def _keypair(d: Path) -> Path:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = d / "key.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return key


def test_spdx_document_validates_with_spdx_tools_and_hashes_are_the_files(merged: Path, tmp_path: Path) -> None:
    from spdx_tools.spdx.model import ChecksumAlgorithm, RelationshipType
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    out = merged / "bom.spdx.json"
    assert main(["bom", str(merged), "--format", "spdx", "-o", str(out)]) == 0
    doc = parse_file(str(out))  # spdx-tools' own parser, then its validator
    assert validate_full_spdx_document(doc) == []
    listed = {f.name.removeprefix("./"): {c.algorithm: c.value for c in f.checksums} for f in doc.files}
    on_disk = {f.name: f for f in merged.iterdir() if f.name != "bom.spdx.json"}
    assert set(listed) == set(on_disk)
    for name, sums in listed.items():
        data = on_disk[name].read_bytes()
        assert sums[ChecksumAlgorithm.SHA256] == hashlib.sha256(data).hexdigest()
        assert sums[ChecksumAlgorithm.SHA1] == hashlib.sha1(data).hexdigest()
    model = doc.packages[0]
    assert model.name == "Llama-4-Scout-merged" and str(model.license_declared) == "LicenseRef-llama4"
    assert doc.extracted_licensing_info[0].extracted_text == (merged / "LICENSE").read_text()
    codes = sorted(hashlib.sha1(p.read_bytes()).hexdigest() for p in on_disk.values())
    assert model.verification_code.value == hashlib.sha1("".join(codes).encode()).hexdigest()
    ancestors = {r.related_spdx_element_id for r in doc.relationships
                 if r.relationship_type == RelationshipType.DESCENDANT_OF}
    by_id = {p.spdx_id: p for p in doc.packages}
    purls = [ref.locator for i in ancestors for ref in by_id[i].external_references]
    assert purls == [f"pkg:huggingface/meta-llama/Llama-4-Scout-17B-16E-Instruct@{REV}"]
    assert any(c.value == ADAPTER_SHA for i in ancestors for c in by_id[i].checksums)
    assert json.loads(model.comment)["operations"][1]["op"] == "merge"


def test_license_check_reads_signature_and_boms_as_data(merged: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from toolbox.supply.sign import sign_artifact

    report = check_artifact(merged)
    assert report.ok and "no signature beside the artifact (corral sign)" in report.notes
    build_bom(merged, merged / "bom.cdx.json")
    build_bom(merged, merged / "bom.spdx.json", fmt="spdx")
    sign_artifact(merged, _keypair(tmp_path))  # covers both BOMs
    report = check_artifact(merged, hashes=True)
    assert report.ok, report.findings
    assert sum("matches the files (names and sha256)" in n for n in report.notes) == 3

    notice = merged / "NOTICE"
    notice.write_bytes(notice.read_bytes() + b"\nAnother notice.\n")  # still compliant, but not what was signed
    assert check_artifact(merged).ok  # names only: nothing to see
    report = check_artifact(merged, hashes=True)
    assert sorted(f.code for f in report.findings) == ["bom-inconsistent", "bom-inconsistent",
                                                       "signature-inconsistent"]
    assert all(f.severity == "warning" and "NOTICE: sha256 differs" in f.message for f in report.findings)
    assert main(["license", "check", str(merged), "--hashes"]) == 1
    assert "signature-inconsistent" in capsys.readouterr().out

    # a BOM whose declaration is not the stamp's; an added file; an unreadable signature
    build_bom(merged, merged / "bom.cdx.json", force=True)
    doc = json.loads((merged / "bom.cdx.json").read_text())
    for p in doc["metadata"]["component"]["properties"]:
        if p["name"] == "corral:license:mau_declaration":
            p["value"] = "meta-license:SOMEONE-ELSE"
    (merged / "bom.cdx.json").write_text(json.dumps(doc))
    (merged / "extra.txt").write_text("added\n")
    (merged / "model.sig").write_text("{}")
    found = [(f.code, f.message) for f in check_artifact(merged).findings]
    assert [m for c, m in found if c == "signature-inconsistent"] == [
        f"{merged / 'model.sig'}: not a model-signing bundle (KeyError)"]
    cdx = next(m for c, m in found if c == "bom-inconsistent" and "bom.cdx.json" in m)
    assert cdx.startswith("extra.txt: in the artifact but not in bom.cdx.json (and 1 more)")
    (merged / "extra.txt").unlink()
    cdx = next(f.message for f in check_artifact(merged).findings if "bom.cdx" in f.path)
    assert cdx == "its mau_declaration is 'meta-license:SOMEONE-ELSE', the in-file stamp says 'below-700m'"
