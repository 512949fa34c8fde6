"""GGUF -> ONNX and ONNX -> GGUF streamed through views (converters/hf_views.py): the outputs equal, byte for
byte, those of the two-step path through an HF checkpoint on disk (convert to hf, then from hf), and no
safetensors file is written. The runtimes' own checks (onnxruntime vs llama.cpp) are in test_via_hf.py."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from license import keys as K
from license.stamp import LicenseOptions
from toolbox.convert import ConvertRequest, convert
from toolbox.tensors.gguf.reader import GGUFFile
from toolbox.tensors.sink import SafetensorsWriter

DECL = LicenseOptions(mau_declaration="below-700m")
SMALL_FILES = ("config.json", "genai_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "NOTICE", "LICENSE", "USE_POLICY.md")


def _no_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("a safetensors file was written")

    monkeypatch.setattr(SafetensorsWriter, "begin", refuse)


def _provenance(meta: dict[str, str], drop_source: bool) -> dict:
    """The provenance without its time, and without "source" (the staged copy's directory name, there)."""
    prov = json.loads(meta[K.PROVENANCE])
    prov.pop("time", None)
    if drop_source:
        prov.pop("source")
    return prov


def _same_stamp(a: dict[str, str], b: dict[str, str], label: str, name: str) -> None:
    """The same stamp but for provenance "source" and the name, which the streamed output takes from its
    input (`label`), the staged path from the name of its staging directory."""
    assert _provenance(a, False)["source"] == label and a[K.MODEL_NAME] == name
    assert _provenance(a, True) == _provenance(b, True)
    own = (K.PROVENANCE, K.MODEL_NAME)
    assert {k: v for k, v in a.items() if k not in own} == {k: v for k, v in b.items() if k not in own}


@pytest.mark.slow
def test_gguf_to_onnx_streams_what_the_staged_path_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.onnx_weights as ow
    from converters.gguf_to_hf import convert_gguf_to_hf
    from converters.onnx_export import convert_hf_to_onnx

    gguf = tmp_path / "s.gguf"
    convert(ConvertRequest("demo:scout", "gguf", gguf, outtype="q8_0", license=DECL))  # dequantized on the way
    monkeypatch.setattr(ow, "PIECE_BYTES", 4 * 1024**2)  # the 51 MB embedding goes in row blocks of the GGUF
    hf = tmp_path / "staged-hf"
    convert_gguf_to_hf(gguf, hf, dtype="f32", license_options=DECL)
    convert_hf_to_onnx(hf, tmp_path / "staged", license_options=DECL)
    _no_safetensors(monkeypatch)
    res = convert(ConvertRequest(gguf, "onnx", tmp_path / "streamed", license=DECL))
    assert res.data["dtype"] == "fp32"
    a, b = tmp_path / "streamed", tmp_path / "staged"
    assert (a / "model.onnx.data").read_bytes() == (b / "model.onnx.data").read_bytes()
    for name in SMALL_FILES:
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists() and name != "genai_config.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "genai_config.json").read_text()) == json.loads((b / "genai_config.json").read_text())
    ga, gb = (onnx.load(str(d / "model.onnx"), load_external_data=False) for d in (a, b))
    assert ga.graph.SerializeToString() == gb.graph.SerializeToString()
    _same_stamp({p.key: p.value for p in ga.metadata_props}, {p.key: p.value for p in gb.metadata_props}, "s.gguf",
                "Llama-4-s-fp32")
    ops = json.loads({p.key: p.value for p in ga.metadata_props}[K.PROVENANCE])["operations"]
    assert [(o["op"], o["to"]) for o in ops[-2:]] == [("convert", "hf"), ("convert", "onnx")] and ops[-2]["lossy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf", "staged", "staged-hf", "streamed"]  # no partial
    assert not list(a.glob("*.safetensors"))


@pytest.mark.slow
def test_onnx_to_gguf_streams_what_the_staged_path_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.hf_to_gguf as h2g
    from converters.onnx_to_hf import convert_onnx_to_hf

    onnx_dir = tmp_path / "onnx"
    convert(ConvertRequest("demo:maverick", "onnx", onnx_dir, license=DECL))
    monkeypatch.setattr(h2g, "ROW_CHUNK_BYTES", 4 * 1024**2)  # row blocks read by byte range from model.onnx.data
    hf = tmp_path / "staged-hf"
    convert_onnx_to_hf(onnx_dir, hf, license_options=DECL)
    h2g.convert_hf_to_gguf(hf, tmp_path / "staged.gguf", outtype="q8_0", license_options=DECL)
    _no_safetensors(monkeypatch)
    convert(ConvertRequest(onnx_dir, "gguf", tmp_path / "streamed.gguf", outtype="q8_0", license=DECL))
    a, b = GGUFFile(tmp_path / "streamed.gguf"), GGUFFile(tmp_path / "staged.gguf")
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.tensor_type, t.data_offset, t.n_bytes) == (u.tensor_type, u.data_offset, u.n_bytes), name
        assert t.data.tobytes() == u.data.tobytes(), name
    fa = {k: v for k, v in a.fields.items() if k.startswith("corral.")}
    fb = {k: v for k, v in b.fields.items() if k.startswith("corral.")}
    _same_stamp(fa, fb, "onnx", "Llama-4-onnx-q8_0")
    assert a.fields["general.name"] == "Llama-4-onnx-q8_0"
    plain = [{k: v for k, v in f.fields.items() if not k.startswith("corral.") and k != "general.name"} for f in (a, b)]
    assert plain[0] == plain[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "staged-hf", "staged.gguf", "streamed.gguf"]
