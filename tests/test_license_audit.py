"""The audit on a corpus built outside corral: it reports nothing on compliant artifacts and,
on each seeded violation, exactly the findings that violation implies."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from license_corpus import (
    POLICY,
    adapter_dir,
    gguf_file,
    gguf_hand_kv,
    hand_keys,
    hf_compliant_by_hand,
    hf_dir,
    onnx_compliant_by_hand,
    onnx_dir,
    write_texts,
)
from safetensors import safe_open
from safetensors.torch import save_file

from license.audit import RULES, check_artifact
from license.retrofit import stamp_artifact
from license.stamp import Stamp


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _meta(shard: Path, **changes: str | None) -> None:
    """Rewrite a shard's __metadata__ with safetensors itself (None deletes a key)."""
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        meta = dict(f.metadata())
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(shard), metadata=meta)


# -- compliant ----------------------------------------------------------------------------------------
def _stamped_adapter(tmp: Path) -> Path:
    d = adapter_dir(tmp / "adapter")
    stamp_artifact(d, Stamp.create("adapter", fix=True, declaration="below-700m", relation="adapter"))
    return d


def _sidecars_only(tmp: Path) -> Path:
    """Like a Meta download plus sidecars: weights without any in-file stamp."""
    d = hf_dir(tmp / "plain", multimodal=False)
    write_texts(d, "Llama-4-plain", multimodal=False)
    return d


def _gguf_beside_a_project_readme(tmp: Path) -> Path:
    """A GGUF written into a source checkout: the project's README/LICENSE are not the model's sidecars."""
    (tmp / "README.md").write_text("# some project\n\nNot a model card.\n")
    (tmp / "LICENSE").write_text("Apache License 2.0\n")
    return gguf_file(tmp / "Llama-4-Scout-Q8_0.gguf", gguf_hand_kv())


def _not_llama(tmp: Path) -> Path:
    d = tmp / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    save_file({"encoder.layer.0.attention.self.query.weight": __import__("torch").ones(2, 2)},
              str(d / "model.safetensors"))
    return d


def _llama31_stamped(tmp: Path) -> Path:
    d = tmp / "l31"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"model.layers.0.mlp.gate_proj.weight": __import__("torch").ones(2, 2)}, str(d / "model.safetensors"))
    stamp_artifact(d, Stamp.create("Llama-3.1-8B-ft", declaration="below-700m", policy_id="llama3_1"), force=True)
    return d


COMPLIANT: dict[str, Callable[[Path], Path]] = {
    "hf-multimodal-by-hand": lambda t: hf_compliant_by_hand(t / "hf"),
    "hf-text-sharded-by-hand": lambda t: hf_compliant_by_hand(t / "hf", multimodal=False, shards=2),
    "hf-sidecars-only": _sidecars_only,
    "gguf-lone-by-hand": lambda t: gguf_file(t / "Llama-4-Scout-Q8_0.gguf", gguf_hand_kv()),
    "gguf-beside-project-readme": _gguf_beside_a_project_readme,
    "onnx-by-hand": lambda t: onnx_compliant_by_hand(t / "onnx"),
    "onnx-multimodal-by-hand": lambda t: onnx_compliant_by_hand(t / "onnx", multimodal=True),
    "adapter-stamped": _stamped_adapter,
    "llama3.1-claimed-and-stamped": _llama31_stamped,
}


@pytest.mark.parametrize("case", list(COMPLIANT))
def test_compliant_artifacts_have_no_findings(case: str, tmp_path: Path) -> None:
    report = check_artifact(COMPLIANT[case](tmp_path))
    assert report.findings == [] and report.ok and int(report.exit_code) == 0
    assert report.policy == ("llama3_1" if case.startswith("llama3.1") else "llama4")


def test_a_model_under_no_llama_license_has_nothing_to_check(tmp_path: Path) -> None:
    report = check_artifact(_not_llama(tmp_path))
    assert report.ok and report.policy is None and not report.is_llama and "no obligations" in report.notes[0]


# -- seeded violations ---------------------------------------------------------------------------------
def _hf(t: Path) -> Path:
    return hf_compliant_by_hand(t / "hf")


def _hf2(t: Path) -> Path:
    return hf_compliant_by_hand(t / "hf", multimodal=False, shards=2)


def _gguf(**kv: str | None) -> Callable[[Path], Path]:
    def build(t: Path) -> Path:
        fields = {k.replace("__", "."): v for k, v in {**gguf_hand_kv(), **kv}.items()}
        return gguf_file(t / "m.gguf", {k: v for k, v in fields.items() if v is not None})
    return build


def _onnx(multimodal: bool = False, **props: str | None) -> Callable[[Path], Path]:
    def build(t: Path) -> Path:
        name = "Llama-4-Scout-onnx-handmade"
        keys = {**hand_keys(name, multimodal=multimodal), **{k.replace("__", "."): v for k, v in props.items()}}
        d = onnx_dir(t / "onnx", multimodal=multimodal, props={k: v for k, v in keys.items() if v is not None})
        write_texts(d, name, multimodal=multimodal)
        return d
    return build


def _mutated(build: Callable[[Path], Path], mutate: Callable[[Path], object]) -> Callable[[Path], Path]:
    def run(t: Path) -> Path:
        d = build(t)
        mutate(d)
        return d
    return run


def _card_field(d: Path, old: str, new: str) -> None:
    _edit(d / "README.md", old, new)


NOTICE_C = POLICY.notice.replace("©", "(c)")
EU = POLICY.multimodal_restriction or ""

VIOLATIONS: dict[str, tuple[Callable[[Path], Path], set[str]]] = {
    # HF directory (multimodal, compliant by hand) with one thing broken
    "hf/no-notice": (_mutated(_hf, lambda d: (d / "NOTICE").unlink()), {"notice-missing"}),
    "hf/notice-(c)": (_mutated(_hf, lambda d: (d / "NOTICE").write_text(NOTICE_C + "\n")), {"notice-altered"}),
    "hf/no-license": (_mutated(_hf, lambda d: (d / "LICENSE").unlink()), {"license-text-missing"}),
    "hf/license-crlf": (_mutated(_hf, lambda d: (d / "LICENSE").write_bytes(
        POLICY.text_bytes("LICENSE").replace(b"\n", b"\r\n"))), {"license-text-altered"}),
    "hf/no-use-policy": (_mutated(_hf, lambda d: (d / "USE_POLICY.md").unlink()), {"use-policy-missing"}),
    "hf/use-policy-cut": (_mutated(_hf, lambda d: (d / "USE_POLICY.md").write_bytes(
        POLICY.text_bytes("USE_POLICY.md")[:500])), {"use-policy-altered"}),
    "hf/no-attribution": (_mutated(_hf, lambda d: _card_field(d, "**Built with Llama**", "Made by us")),
                          {"attribution-missing"}),
    "hf/no-card": (_mutated(_hf, lambda d: (d / "README.md").unlink()), {"attribution-missing"}),
    "hf/card-bad-yaml": (_mutated(_hf, lambda d: _card_field(d, "license: other", "license: [other")),
                         {"card-invalid"}),
    "hf/card-title": (_mutated(_hf, lambda d: _card_field(d, "# Llama-4-Scout-handmade", "# SuperScout")),
                      {"name-prefix"}),
    "hf/card-apache": (_mutated(_hf, lambda d: _card_field(d, "license: other\nlicense_name: llama4",
                                                           "license: apache-2.0")), {"relabelled"}),
    "hf/card-no-license": (_mutated(_hf, lambda d: _card_field(d, "license: other\nlicense_name: llama4\n", "")),
                           {"license-label-missing"}),
    "hf/declared-above": (_mutated(_hf, lambda d: _card_field(d, "mau_declaration: below-700m",
                                                              "mau_declaration: above-700m")),
                          {"declaration-invalid", "metadata-mismatch"}),
    "hf/no-declaration": (_mutated(_hf, lambda d: (_card_field(d, "  mau_declaration: below-700m\n", ""),
                                                   _meta(d / "model.safetensors",
                                                         corral__license__mau_declaration=None))),
                          {"declaration-missing"}),
    "hf/file-name-differs": (_mutated(_hf, lambda d: _meta(d / "model.safetensors",
                                                           corral__model__name="Llama-4-other")),
                             {"metadata-mismatch"}),
    "hf/card-no-eu": (_mutated(_hf, lambda d: _card_field(d, EU, "")), {"eu-clause-missing"}),
    "hf/file-no-eu": (_mutated(_hf, lambda d: _meta(d / "model.safetensors",
                                                    corral__license__multimodal_restriction=None)),
                      {"eu-clause-missing"}),
    "hf/file-license-apache": (_mutated(_hf, lambda d: _meta(d / "model.safetensors", license="apache-2.0")),
                               {"relabelled"}),
    "hf/shards-disagree": (_mutated(_hf2, lambda d: _meta(d / "model-00002-of-00002.safetensors",
                                                          corral__license__mau_declaration="meta-license:X")),
                           {"metadata-mismatch"}),
    # a signature or BOM beside the artifact that does not match it (read as data; tests/test_supply_checks.py)
    "hf/signature-not-a-bundle": (_mutated(_hf, lambda d: (d / "model.sig").write_text("{}")),
                                  {"signature-inconsistent"}),
    "hf/bom-lists-nothing": (_mutated(_hf, lambda d: (d / "bom.cdx.json").write_text(json.dumps(
        {"bomFormat": "CycloneDX", "metadata": {"component": {"name": "x", "components": []}}}))),
                             {"bom-inconsistent"}),
    # lone GGUF (compliant by hand) with one thing broken
    "gguf/mit": (_gguf(general__license="mit"), {"relabelled"}),
    "gguf/name": (_gguf(general__name="Scout-ft-Q8_0"), {"name-prefix"}),
    "gguf/no-notice": (_gguf(corral__license__notice=None), {"notice-missing"}),
    "gguf/notice-(c)": (_gguf(corral__license__notice=NOTICE_C), {"notice-altered"}),
    "gguf/no-declaration": (_gguf(corral__license__mau_declaration=None), {"declaration-missing"}),
    "gguf/declared-above": (_gguf(corral__license__mau_declaration="over-700m"), {"declaration-invalid"}),
    "gguf/no-attribution": (_gguf(corral__license__attribution=None), {"attribution-missing"}),
    "gguf/unlabelled": (_gguf(general__license=None, corral__license__policy=None), {"license-label-missing"}),
    # a Llama 4 GGUF whose metadata claims nothing Llama at all: recognised by its architecture
    "gguf/disguised": (lambda t: gguf_file(t / "m.gguf", {"general.name": "Llama-ish",
                                                          "general.license": "apache-2.0"}),
                       {"relabelled", "notice-missing", "attribution-missing", "declaration-missing"}),
    # a Llama 4 vision projector (mmproj) stamped as if it were text-only
    "gguf/mmproj-no-eu": (lambda t: gguf_file(t / "mmproj.gguf", {**gguf_hand_kv(), "clip.projector_type": "llama4"},
                                              arch="clip"), {"eu-clause-missing"}),
    # ONNX directory (compliant by hand) with one thing broken
    "onnx/apache": (_onnx(license="apache-2.0"), {"relabelled"}),
    "onnx/name": (_onnx(corral__model__name="scout-onnx"), {"name-prefix", "metadata-mismatch"}),
    "onnx/mm-no-eu": (_onnx(True, corral__license__multimodal_restriction=None), {"eu-clause-missing"}),
    "onnx/lone-bare": (lambda t: onnx_dir(t / "o", external=False) / "model.onnx",
                       {"notice-missing", "attribution-missing", "license-label-missing", "name-missing",
                        "declaration-missing"}),
    # PEFT adapter stamped by corral, then relabelled by hand
    "adapter/mit": (_mutated(_stamped_adapter, lambda d: _card_field(d, "license: other\nlicense_name: llama4",
                                                                     "license: mit")), {"relabelled"}),
    # bare HF directory: everything at once
    "hf/bare": (lambda t: hf_dir(t / "bare"), {"notice-missing", "license-text-missing", "use-policy-missing",
                                               "attribution-missing", "license-label-missing", "name-missing",
                                               "declaration-missing", "eu-clause-missing"}),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_each_seeded_violation_is_found_and_nothing_else(case: str, tmp_path: Path) -> None:
    build, expected = VIOLATIONS[case]
    report = check_artifact(build(tmp_path))
    assert report.codes() == expected, [(f.code, f.message) for f in report.findings]
    assert report.exit_code == 1 and report.policy == "llama4"
    for f in report.findings:
        assert f.clause == (POLICY.clause(RULES[f.code].clause_key) if RULES[f.code].clause_key != "supply"
                            else "supply-chain") or f.code == "metadata-mismatch"
        assert f.clause and f.fix and f.message and Path(f.path).name


def test_every_rule_is_exercised_by_the_corpus() -> None:
    seeded = set().union(*(codes for _, codes in VIOLATIONS.values()))
    assert seeded == set(RULES)


def test_findings_name_the_file_and_the_fix(tmp_path: Path) -> None:
    d = hf_compliant_by_hand(tmp_path / "hf")
    _edit(d / "README.md", "# Llama-4-Scout-handmade", "# scout-ft")
    (d / "LICENSE").write_bytes(POLICY.text_bytes("LICENSE").replace(b"Meta", b"Mesa", 1))
    report = check_artifact(d)
    by_code = {f.code: f for f in report.findings}
    assert by_code["name-prefix"].path == str(d / "README.md") and "'Llama-scout-ft'" in by_code["name-prefix"].fix
    assert by_code["name-prefix"].line is not None
    assert (d / "README.md").read_text().splitlines()[by_code["name-prefix"].line - 1] == "# scout-ft"
    altered = by_code["license-text-altered"]
    assert altered.clause == "1.b.i(A)" and altered.line == 8  # the line of the first "Meta"
    assert report.recognised_by[0] == "config.json architectures Llama4ForConditionalGeneration"
