"""The conversion entry point (toolbox.convert), the model reference and the one stamp derivation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from test_merge import DECL, EXPERTS, make_adapter

from converters.registry import PAIRS, converter_for
from license.stamp import LicenseOptions, StampInput, default_name, derive_stamp
from toolbox.convert import ConvertRequest, _converter_options, convert, source_format
from toolbox.errors import BadInputError, LicensePolicyError, UsageError
from toolbox.reference import ModelReference, load_checkpoint, resolve
from toolbox.tensors.gguf.reader import GGUFFile


def _provenance_ops(path: Path) -> list[str]:
    if path.suffix == ".gguf":
        prov = GGUFFile(path).get("corral.provenance")
    else:
        shard = sorted(path.glob("*.safetensors"))[0]
        with safe_open(str(shard), "pt") as f:
            prov = f.metadata()["corral.provenance"]
    return [op["op"] for op in json.loads(prov)["operations"]]


def test_a_reference_is_parsed_without_work_and_resolved_once(scout_dir: Path) -> None:
    ref = ModelReference.parse("demo:scout")
    assert (ref.kind, ref.label) == ("demo", "demo:scout")
    assert ModelReference.parse(scout_dir).kind == "path" and ModelReference.parse(scout_dir).label == scout_dir.name
    model = resolve(ref)
    assert model.path == scout_dir and resolve(model) is model  # a resolved model passes through
    assert model.checkpoint is model.checkpoint  # the config is read once
    assert load_checkpoint("demo:scout").text.experts == 16  # the library keeps accepting demo:*
    from toolbox.checkpoint import load_checkpoint as load_path

    with pytest.raises(BadInputError):  # the layer below the demo generator takes paths only
        load_path("demo:scout")


def test_the_registry_is_the_dispatch() -> None:
    assert set(PAIRS) == {("hf", "gguf"), ("gguf", "hf"), ("hf", "onnx"), ("onnx", "hf"), ("hf", "hf"),
                          ("gguf", "onnx"), ("onnx", "gguf")}
    assert converter_for("hf", "gguf").load().__name__ == "convert_hf_to_gguf"
    with pytest.raises(UsageError, match="no converter from onnx to onnx"):
        converter_for("onnx", "onnx")
    # an unsupported pair is refused from the name alone: the demo is not generated for it
    assert source_format(ConvertRequest("demo:maverick", "hf", Path("x"))) == "hf"
    with pytest.raises(UsageError):
        convert(ConvertRequest("demo:nonexistent", "xyz", Path("x")))


def test_request_options_are_validated_and_normalised_in_one_place() -> None:
    from converters.onnx_export import resolve_dtype

    onnx = _converter_options(ConvertRequest("demo:scout", "onnx", Path("o")), "hf", "onnx")
    assert resolve_dtype(onnx["dtype"]) == "float32" and onnx["kv_cache"] is True  # ONNX auto means fp32, once
    assert _converter_options(ConvertRequest("demo:scout", "hf", Path("o"), dtype="auto"), "gguf", "hf")[
        "dtype"] == "auto"
    gguf = _converter_options(ConvertRequest("demo:scout", "gguf", Path("o.gguf"), split_max_size="2M"), "hf", "gguf")
    assert gguf["split_max_size"] == 2_000_000
    with pytest.raises(UsageError, match="not a size"):
        _converter_options(ConvertRequest("demo:scout", "gguf", Path("o.gguf"), split_max_size="lots"), "hf", "gguf")
    with pytest.raises(UsageError, match="--mmproj"):
        _converter_options(ConvertRequest("demo:scout", "gguf", Path("o.gguf"), mmproj="x.gguf"), "hf", "gguf")
    back = _converter_options(ConvertRequest("a.gguf", "hf", Path("o"), mmproj="a.mmproj.gguf"), "gguf", "hf")
    assert back["mmproj"] == "a.mmproj.gguf"


@pytest.mark.slow
def test_mmproj_pairing_reads_the_source_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import toolbox.checkpoint

    resolve("demo:scout")  # generated outside the count
    calls: list[Path] = []
    real = toolbox.checkpoint.load_checkpoint
    monkeypatch.setattr(toolbox.checkpoint, "load_checkpoint", lambda p: calls.append(Path(p)) or real(p))
    out = tmp_path / "s.gguf"
    res = convert(ConvertRequest("demo:scout", "gguf", out, outtype="f16", mmproj="auto",
                                 license=LicenseOptions(mau_declaration=DECL)))
    assert len(calls) == 1, calls
    assert res.paths == [out, tmp_path / "s.mmproj.gguf"] and res.data["mmproj"]["outtype"] == "F16"
    text, mm = GGUFFile(out), GGUFFile(res.paths[1])
    assert text.get("general.name") == mm.get("general.name") == "Llama-4-Scout-demo-f16"  # one model, two files
    assert mm.get("corral.model.multimodal") == "true" == text.get("corral.model.multimodal")


def test_a_refused_declaration_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    with pytest.raises(LicensePolicyError):
        convert(ConvertRequest("demo:scout", "gguf", tmp_path / "s.gguf", mmproj="auto"))
    assert list(tmp_path.iterdir()) == []


def test_default_names_and_options() -> None:
    assert default_name("demo:scout", "q8_0") == "Llama-4-Scout-demo-q8_0"
    assert default_name("/x/my-ft", "merged") == "Llama-4-my-ft-merged"
    assert default_name("scout-v4", "dense", family="scout-like") == "Llama-4-Scout-demo-dense"
    assert default_name("llama-tiny.gguf") == "Llama-tiny" and default_name("Llama-4-x") == "Llama-4-x"
    opts = LicenseOptions.of(LicenseOptions(mau_declaration=DECL), name="Llama-a", fix_name=False)
    assert opts == LicenseOptions(name="Llama-a", mau_declaration=DECL)
    with pytest.raises(TypeError, match="declaration"):
        LicenseOptions.of(None, declaration=DECL)


def test_derive_stamp_carries_the_history_and_the_relation() -> None:
    first = derive_stamp(StampInput("demo:scout"), {"op": "merge"}, LicenseOptions(mau_declaration=DECL),
                         suffix="merged", relation="merge", base_model="meta-llama/Llama-4-Scout-17B-16E-Instruct",
                         sources={"a/adapter_model.safetensors": "sha256:00"})
    second = derive_stamp(StampInput("m", prior=first.keys()), {"op": "convert", "to": "gguf"},
                          LicenseOptions(mau_declaration=DECL), suffix="q8_0", relation="quantized")
    prov = second.provenance_dict()
    assert [op["op"] for op in prov["operations"]] == ["merge", "convert"]
    assert second.relation == "merge" and second.base_model == first.base_model  # a quantized merge is a merge
    assert prov["sources"] == {"a/adapter_model.safetensors": "sha256:00"} and prov["source"] == "m"
    assert second.name == "Llama-4-m-q8_0"
    round_trip = derive_stamp(StampInput("m.gguf", prior=second.keys(), carried_name=second.name),
                              {"op": "convert", "to": "hf"}, LicenseOptions(mau_declaration=DECL))
    assert round_trip.name == second.name and len(round_trip.provenance.operations) == 3


@pytest.mark.slow
def test_merge_then_prune_then_convert_keeps_every_operation(tmp_path: Path, scout_dir: Path) -> None:
    from toolbox.experts.prune import prune_experts
    from toolbox.merge import merge_adapters

    adapter = make_adapter(scout_dir, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"],
                           target_parameters=EXPERTS)
    merged = merge_adapters("demo:scout", [adapter], tmp_path / "merged", mau_declaration=DECL).path
    pruned = prune_experts(merged, tmp_path / "pruned", keep=list(range(8)), mau_declaration=DECL).path
    assert _provenance_ops(pruned) == ["merge", "prune-experts"]
    with safe_open(str(sorted(pruned.glob("*.safetensors"))[0]), "pt") as f:
        meta = f.metadata()
    assert meta["corral.base_model.relation"] == "finetune"  # one adapter: the merge's relation is kept
    out = convert(ConvertRequest(pruned, "gguf", tmp_path / "p.gguf", outtype="q8_0",
                                 license=LicenseOptions(mau_declaration=DECL))).paths[0]
    assert _provenance_ops(out) == ["merge", "prune-experts", "convert"]
    back = convert(ConvertRequest(out, "hf", tmp_path / "back", license=LicenseOptions(mau_declaration=DECL)))
    assert _provenance_ops(back.paths[0]) == ["merge", "prune-experts", "convert", "convert"]


MMPROJ_RECIPE = """\
corral: 1
name: pair
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - id: gguf
    uses: convert
    with: {to: gguf, outtype: f16, mmproj: auto, mmproj_outtype: f32}
    output: Llama-4-pair.gguf
  - id: onnx
    uses: convert
    with: {to: onnx, opset: 19, kv_cache: false}
    output: Llama-4-pair-onnx
"""


@pytest.mark.slow
def test_recipe_convert_takes_the_cli_options_and_publishes_the_mmproj(tmp_path: Path) -> None:
    import onnx

    from toolbox.recipe import load_recipe, run_recipe

    recipe = tmp_path / "pair.yaml"
    recipe.write_text(MMPROJ_RECIPE)
    run_recipe(load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache")
    text, mm = GGUFFile(tmp_path / "out" / "Llama-4-pair.gguf"), GGUFFile(tmp_path / "out" / "Llama-4-pair.mmproj.gguf")
    assert text.get("general.architecture") == "llama4" and mm.get("general.architecture") == "clip"
    assert mm.type_name("v.blk.0.attn_q.weight") == "F32" and text.get("general.name") == mm.get("general.name")
    model = onnx.load(str(tmp_path / "out" / "Llama-4-pair-onnx" / "model.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 19 and not [i for i in model.graph.input if "past" in i.name]


def test_a_malformed_prior_stamp_is_ignored_not_fatal() -> None:
    prior = {"corral.provenance": json.dumps({"operations": [{"op": "merge"}, {"no": "op"}, 3], "sources": [1]}),
             "corral.base_model.relation": "stolen"}
    stamp = derive_stamp(StampInput("x", prior=prior), {"op": "convert"}, LicenseOptions(mau_declaration=DECL))
    assert [op["op"] for op in stamp.provenance.operations] == ["merge", "convert"] and stamp.relation is None
    assert derive_stamp(StampInput("x", prior={"corral.provenance": "{not json"}), {"op": "convert"},
                        LicenseOptions(mau_declaration=DECL)).provenance.operations == [{"op": "convert"}]
