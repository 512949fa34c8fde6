"""One stamp, every format: what sinks and converters write reads back with the field's own
readers (huggingface_hub, gguf-py's GGUFReader, onnxruntime), and stamp-then-check passes."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from huggingface_hub import ModelCard
from license_corpus import BASE, POLICY, adapter_dir, gguf_file, hf_dir, onnx_dir, onnx_model, run_onnx

from license.audit import check_artifact
from license.retrofit import stamp_artifact
from license.stamp import Stamp, apply_to_gguf_writer, apply_to_onnx, write_sidecars


def _stamp(name: str = "Llama-4-Scout-ft", **fields) -> Stamp:
    fields.setdefault("declaration", "below-700m")
    return Stamp.create(name, **fields)


def test_safetensors_metadata_is_strings_with_format_pt() -> None:
    meta = _stamp(multimodal=True, base_model=BASE, relation="finetune").safetensors_metadata()
    assert meta["format"] == "pt" and all(isinstance(v, str) for v in meta.values())
    assert meta["corral.license.notice"] == POLICY.notice
    assert meta["corral.license.multimodal_restriction"] == POLICY.multimodal_restriction
    assert meta["corral.base_model.repo"] == BASE and meta["corral.base_model.relation"] == "finetune"
    text_only = _stamp().safetensors_metadata()
    assert "corral.license.multimodal_restriction" not in text_only and text_only["corral.model.multimodal"] == "false"


def test_gguf_writer_keys_read_back_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "Llama-4-Scout-ft.gguf"
    w = gguf.GGUFWriter(path, "llama4")
    w.add_name("placeholder-name")  # a converter may have set these already: the stamp replaces them
    w.add_tags(["moe"])
    apply_to_gguf_writer(w, _stamp(base_model=BASE, relation="quantized"))
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["general.name"] == "Llama-4-Scout-ft"
    assert fields["general.license"] == "llama4"
    assert fields["general.license.name"] == "Llama 4 Community License Agreement"
    assert fields["general.license.link"] == POLICY.license_url
    assert fields["general.base_model.count"] == 1
    assert fields["general.base_model.0.name"] == "Llama-4-Scout-17B-16E-Instruct"
    assert fields["general.base_model.0.organization"] == "meta-llama"
    assert fields["general.base_model.0.repo_url"] == f"https://huggingface.co/{BASE}"
    assert fields["general.tags"] == ["moe", "llama", "llama-4", "built-with-llama", "corral"]
    assert fields["corral.license.notice"] == POLICY.notice
    assert fields["corral.license.attribution"] == "Built with Llama"
    assert fields["corral.license.mau_declaration"] == "below-700m"
    assert json.loads(fields["corral.provenance"])["base_model"]["relation"] == "quantized"
    assert check_artifact(path).ok


def test_gguf_writer_refuses_a_stamp_after_the_header(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama4")
    w.write_header_to_file()
    with pytest.raises(RuntimeError, match="after the GGUF header"):
        apply_to_gguf_writer(w, _stamp())
    w.close()


def test_onnx_props_read_back_with_onnxruntime(tmp_path: Path) -> None:
    import onnx

    model = onnx_model(props={"exporter": "torch.onnx", "corral.license.policy": "stale"})
    apply_to_onnx(model, _stamp(multimodal=True))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    y, meta = run_onnx(path)
    assert np.array_equal(y, np.arange(8, dtype=np.float32).reshape(2, 4) + 1)
    assert meta["exporter"] == "torch.onnx"  # other keys are kept
    assert meta["corral.license.policy"] == "llama4" and meta["corral.model.name"] == "Llama-4-Scout-ft"
    assert meta["corral.license.notice"] == POLICY.notice
    assert meta["corral.license.multimodal_restriction"] == POLICY.multimodal_restriction
    assert meta["corral.producer.original"] == "pytorch 2.13.0"
    loaded = onnx.load(str(path))
    assert loaded.producer_name == "corral" and "Built with Llama" in loaded.doc_string
    assert POLICY.notice in loaded.doc_string


def test_sidecars_and_model_card_parse_back(tmp_path: Path) -> None:
    stamp = _stamp(multimodal=True, base_model=BASE, relation="finetune", base_revision="abc123")
    written = write_sidecars(tmp_path, stamp)
    assert sorted(p.name for p in written) == ["LICENSE", "NOTICE", "README.md", "USE_POLICY.md"]
    assert (tmp_path / "NOTICE").read_text(encoding="utf-8") == POLICY.notice + "\n"
    assert (tmp_path / "LICENSE").read_bytes() == POLICY.text_bytes("LICENSE")
    assert (tmp_path / "USE_POLICY.md").read_bytes() == POLICY.text_bytes("USE_POLICY.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "other" and card.data.license_name == "llama4" and card.data.license_link == "LICENSE"
    assert card.data.base_model == BASE and card.data.base_model_relation == "finetune"
    assert {"llama", "llama-4", "built-with-llama"} <= set(card.data.tags)
    assert card.data.corral == {"policy": "llama4", "model_name": "Llama-4-Scout-ft", "mau_declaration": "below-700m",
                                "multimodal": True}
    lines = card.text.strip().splitlines()
    assert lines[1] == "# Llama-4-Scout-ft" and lines[3] == "**Built with Llama**"  # prominent: right under the title
    assert POLICY.multimodal_restriction in card.text and "700 million" in card.text and "abc123" in card.text
    assert not list(tmp_path.glob(".*"))  # no partial files left


def test_card_merge_keeps_the_authors_text_and_fields(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama4\ndatasets:\n- my/data\n"
                                        "tags:\n- moe\n---\n\n# my-scout\n\nTrained on my data.\n", encoding="utf-8")
    (tmp_path / "NOTICE").write_text("Some other component: (c) ACME\n", encoding="utf-8")
    stamp = _stamp("Llama-my-scout")
    write_sidecars(tmp_path, stamp)
    write_sidecars(tmp_path, stamp)  # idempotent: the block is replaced, not repeated
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["my/data"] and card.data.tags[0] == "moe"
    assert card.text.count("Trained on my data.") == 1 and card.text.count("Built with Llama") == 1
    assert "# my-scout" not in card.text and card.text.count("# Llama-my-scout") == 1
    notice = (tmp_path / "NOTICE").read_text(encoding="utf-8")
    assert notice.startswith("Some other component") and notice.count(POLICY.notice) == 1


@pytest.mark.parametrize("kind", ["hf", "hf-sharded", "adapter", "gguf", "gguf-split", "gguf-dir", "onnx",
                                  "onnx-file"])
def test_stamp_then_check_passes_for_every_format(kind: str, tmp_path: Path) -> None:
    if kind == "hf":
        target = hf_dir(tmp_path / "m")
    elif kind == "hf-sharded":
        target = hf_dir(tmp_path / "m", multimodal=False, shards=2)
    elif kind == "adapter":
        target = adapter_dir(tmp_path / "m")
    elif kind == "gguf":
        target = gguf_file(tmp_path / "m" / "scout.gguf")
    elif kind == "gguf-split":
        target = _split_gguf(tmp_path / "m")
    elif kind == "gguf-dir":  # a GGUF release folder: a split set and a single file, sidecars beside them
        _split_gguf(tmp_path / "m")
        target = gguf_file(tmp_path / "m" / "scout-Q8_0.gguf").parent
    elif kind == "onnx":
        target = onnx_dir(tmp_path / "m", multimodal=True)
    else:
        target = onnx_dir(tmp_path / "m", external=False) / "model.onnx"
    before = check_artifact(target)
    assert not before.ok and before.policy == "llama4"
    stamp_artifact(target, _stamp(base_model=BASE))
    after = check_artifact(target)
    assert after.ok, after.findings
    assert not [p for p in (tmp_path / "m").rglob(".*")], "partial files left behind"


def _split_gguf(d: Path) -> Path:
    """A two-part GGUF split set written by gguf-py itself."""
    d.mkdir(parents=True)
    w = gguf.GGUFWriter(d / "scout.gguf", "llama4", split_max_tensors=1)
    w.add_uint32("llama4.block_count", 1)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(d.glob("*.gguf"))
    assert [p.name for p in parts] == ["scout-00001-of-00002.gguf", "scout-00002-of-00002.gguf"]
    return parts[1]  # any part names the set


def test_fast_kv_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    from toolbox.errors import CorruptFileError
    from toolbox.tensors.gguf.reader import MAX_ARRAY, read_gguf_kv

    tokens = [f"tok{i}" for i in range(MAX_ARRAY + 44)]
    path = gguf_file(tmp_path / "m.gguf", {"general.name": "Llama-4-x", "tokenizer.ggml.tokens": tokens,
                                           "general.tags": ["a", "b"], "llama4.expert_count": 16})
    w = gguf.GGUFWriter(tmp_path / "types.gguf", "llama4")
    w.add_float32("llama4.rope.freq_base", 500000.0)
    w.add_bool("llama4.flag", True)
    w.add_int64("llama4.big", -(2**40))
    w.add_array("tokenizer.ggml.token_type", list(range(MAX_ARRAY + 1)))
    w.add_string("after.arrays", "still read")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    for p in (path, tmp_path / "types.gguf"):
        fast = read_gguf_kv(p)
        full = {k: f.contents() for k, f in gguf.GGUFReader(p).fields.items() if not k.startswith("GGUF.")}
        assert list(fast) == list(full)
        for key, value in full.items():
            assert fast[key] == (None if isinstance(value, list) and len(value) > MAX_ARRAY else value), key
    assert read_gguf_kv(tmp_path / "types.gguf")["after.arrays"] == "still read"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_gguf_kv(cut)
    cut.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        read_gguf_kv(cut)
