"""`--bom FORMAT` on the commands that write artifacts: the BOM lands where `corral bom`, `license check` and
`publish` look (DIR/bom.cdx.json, FILE.cdx.json beside each .gguf file), passes the standard's validator from its
own library (cyclonedx-python-lib, spdx-tools), lists every file with hashlib's sha256, and `license check
--hashes` of the result passes. It is written only once the artifact is complete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.validation import make_schemabased_validator

from toolbox.cli.main import main

MAU = ["--mau-declaration", "below-700m"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cyclonedx_files(bom: Path) -> dict[str, str]:
    """The BOM checked by cyclonedx-python-lib's own schema validator; name -> sha256 of what it lists."""
    text = bom.read_text(encoding="utf-8")
    assert make_schemabased_validator(OutputFormat.JSON, SchemaVersion.V1_6).validate_str(text) is None
    model = json.loads(text)["metadata"]["component"]
    assert model["type"] == "machine-learning-model"
    if not model.get("components"):  # a lone file: the model component carries its hash
        return {"": next(h["content"] for h in model["hashes"] if h["alg"] == "SHA-256")}
    return {c["name"]: next(h["content"] for h in c["hashes"] if h["alg"] == "SHA-256") for c in model["components"]}


@pytest.mark.slow
def test_split_gguf_gets_a_bom_beside_each_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scout.gguf"
    assert main(["--json", "convert", "demo:scout", "--to", "gguf", "-o", str(out), "--split-max-size", "30M",
                 "--bom", "cyclonedx", *MAU]) == 0
    doc = json.loads(capsys.readouterr().out)
    parts = [Path(p) for p in doc["paths"]]
    assert len(parts) >= 2 and all(p.is_file() for p in parts)
    assert [b["path"] for b in doc["boms"]] == [str(p) for p in parts]
    for part in parts:
        bom = part.with_name(part.name + ".cdx.json")
        assert [b["output"] for b in doc["boms"] if b["path"] == str(part)] == [str(bom.absolute())]
        assert _cyclonedx_files(bom) == {"": _sha(part)}
        assert main(["license", "check", str(part), "--hashes"]) == 0


def test_pruned_directory_gets_an_spdx_document_that_spdx_tools_validates(tmp_path: Path) -> None:
    from spdx_tools.spdx.model import ChecksumAlgorithm
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    out = tmp_path / "Llama-4-Scout-8e"
    assert main(["experts", "prune", "demo:scout", "-o", str(out), "--keep", "0-7", "--bom", "spdx", *MAU]) == 0
    doc = parse_file(str(out / "bom.spdx.json"))
    assert validate_full_spdx_document(doc) == []
    listed = {f.name.removeprefix("./"): next(c.value for c in f.checksums if c.algorithm == ChecksumAlgorithm.SHA256)
              for f in doc.files}
    on_disk = {f.name: _sha(f) for f in out.iterdir() if f.name != "bom.spdx.json"}
    assert {"config.json", "NOTICE", "LICENSE"} <= set(on_disk) and any(n.endswith(".safetensors") for n in on_disk)
    assert listed == on_disk
    assert main(["license", "check", str(out), "--hashes"]) == 0


@pytest.mark.slow
def test_weight_merge_and_extracted_adapter_directories(scout_dir: Path, tmp_path: Path) -> None:
    merged, lora = tmp_path / "Llama-4-Scout-avg", tmp_path / "Llama-4-Scout-lora"
    assert main(["merge", "--method", "linear", "demo:scout", str(scout_dir), "-o", str(merged),
                 "--bom", "cyclonedx", *MAU]) == 0
    assert main(["extract-lora", str(merged), "--base", "demo:scout", "-o", str(lora), "--rank", "2",
                 "--target", "attention", "--bom", "cyclonedx", *MAU]) == 0
    for d in (merged, lora):
        assert _cyclonedx_files(d / "bom.cdx.json") == {f.name: _sha(f) for f in d.iterdir()
                                                        if f.name != "bom.cdx.json"}
        assert main(["license", "check", str(d), "--hashes"]) == 0


def test_no_bom_without_its_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed command writes no BOM; replacing a lone file removes the BOM of the old bytes before the new
    one is hashed, so a crash in between leaves the new file without a BOM, never beside a stale one."""
    from license_corpus import gguf_file, gguf_hand_kv

    import toolbox.supply.bom as bom_mod

    out = tmp_path / "Llama-4-Scout-8e"
    out.mkdir()
    assert main(["experts", "prune", "demo:scout", "-o", str(out), "--keep", "0-7", "--bom", "cyclonedx", *MAU]) == 2
    assert list(out.iterdir()) == []  # the output existed without --force: nothing written, no BOM
    gguf = gguf_file(tmp_path / "scout.gguf", gguf_hand_kv())
    old_bom = tmp_path / "scout.gguf.cdx.json"
    assert [r.output for r in bom_mod.write_beside([gguf])] == [old_bom]
    assert _cyclonedx_files(old_bom) == {"": _sha(gguf)}
    gguf_file(gguf, {**gguf_hand_kv(), "general.description": "rebuilt"})  # the file replaced by a new build

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # killed while hashing the new file

    monkeypatch.setattr(bom_mod, "build_bom", crash)
    with pytest.raises(KeyboardInterrupt):
        bom_mod.write_beside([gguf])
    assert not old_bom.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Llama-4-Scout-8e", "scout.gguf"]
