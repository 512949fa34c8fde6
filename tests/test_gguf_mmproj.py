"""Llama 4 vision tower -> mmproj GGUF, checked by the real consumers: llama.cpp's multimodal runtime
(libmtmd, through llama-cpp-python's ctypes bindings) against transformers, and back to HF."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llama_cpp_mtmd import MtmdRuntime, grid_transposed, relative_error  # libmtmd: the real consumer
from safetensors.torch import load_file
from transformers import Llama4ForConditionalGeneration

import converters.gguf_mmproj as gguf_mmproj
import converters.gguf_mmproj_names as names
from converters.gguf_mmproj import convert_hf_to_mmproj
from converters.gguf_mmproj_to_hf import MmprojFile
from converters.gguf_to_hf import convert_gguf_to_hf
from converters.hf_to_gguf import convert_hf_to_gguf
from license import keys as K
from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.errors import BadInputError, OutputExistsError, UnsupportedModelError, UsageError

DECL = "below-700m"
SIDE = 56  # demo vision image_size: exactly one tile, so llama.cpp's preprocessing resizes nothing
TOKENS = (56 // 14 // 2) ** 2  # patches per side / pixel-shuffle factor, squared
# max |llama.cpp - transformers| / max |transformers|. f32 is bounded by ggml's own activations (its
# GELU is a tanh/fp16-table approximation); bf16 and q8_0 add their rounding.
TOLERANCE = {"f32": 3e-3, "f16": 5e-3, "bf16": 1.5e-2, "q8_0": 6e-2}


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _legacy_mapping() -> dict[str, str]:
    """llama.cpp's converter's choice for the vision post_attention_layernorm (attn_post_norm)."""
    return {**names.VISION_BLOCK, "post_attention_layernorm": "V_ENC_ATTN_POST_NORM"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, scout_dir: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mmproj")
    made = {"text": out / "scout-bf16.gguf"}
    convert_hf_to_gguf(scout_dir, made["text"], outtype="bf16", mau_declaration=DECL)
    for outtype in TOLERANCE:
        made[outtype] = out / f"scout-{outtype}.mmproj.gguf"
        convert_hf_to_mmproj(scout_dir, made[outtype], outtype=outtype, mau_declaration=DECL)
    # the same tensors the way llama.cpp's own converter names them, and without corral's stored config
    saved, saved_key = dict(names.VISION_BLOCK), gguf_mmproj.PROVENANCE_KEY
    try:
        names.VISION_BLOCK.update(_legacy_mapping())
        gguf_mmproj.PROVENANCE_KEY = "corral.test.unused"
        made["legacy"] = out / "scout-legacy.mmproj.gguf"
        convert_hf_to_mmproj(scout_dir, made["legacy"], outtype="f32", mau_declaration=DECL)
    finally:
        names.VISION_BLOCK.clear()
        names.VISION_BLOCK.update(saved)
        gguf_mmproj.PROVENANCE_KEY = saved_key
    return made


@pytest.fixture(scope="module")
def runtime(files) -> MtmdRuntime:
    return MtmdRuntime(files["text"])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)


def _pixels(img: np.ndarray) -> torch.Tensor:
    """What both sides feed the vision tower: RGB / 255, normalised with mean = std = 0.5."""
    px = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return (px - 0.5) / 0.5


def _hf_embeddings(model: Llama4ForConditionalGeneration, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.multi_modal_projector(model.vision_model(_pixels(img)).last_hidden_state)[0].numpy()


@pytest.fixture(scope="module")
def reference(scout_dir: Path, image: np.ndarray) -> np.ndarray:
    return _hf_embeddings(Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32), image)


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_llama_cpp_image_embeddings_match_transformers(outtype: str, files, runtime, image, reference) -> None:
    got = runtime.image_embeddings(files[outtype], image)
    assert got.shape == (TOKENS, runtime.n_embd) == reference.shape
    # llama.cpp emits the merged token grid column by column (its pixel shuffle lacks transformers' last
    # permute); relative_error accepts either order, so this keeps passing if llama.cpp fixes that
    assert grid_transposed(np.arange(TOKENS)[:, None]).ravel().tolist() == [0, 2, 1, 3]
    err, order = relative_error(got, reference)
    assert err < TOLERANCE[outtype], (outtype, err, order)
    assert order == "column-major"  # llama.cpp 0.3.36; update when it changes


def test_llama_cpp_own_norm_mapping_computes_something_else(files, runtime, image, reference, capsys) -> None:
    """gguf-py maps the vision post_attention_layernorm to attn_post_norm; llama.cpp then normalises the
    attention output (bias dropped) and skips the pre-MLP norm: far from transformers, where ln2 matches."""
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 2)
    assert m.get_name("vision_model.model.layers.0.post_attention_layernorm") == "v.blk.0.attn_post_norm"
    ours, _ = relative_error(runtime.image_embeddings(files["f32"], image), reference)
    theirs, _ = relative_error(runtime.image_embeddings(files["legacy"], image), reference)
    assert ours < TOLERANCE["f32"] and theirs > 0.1, (ours, theirs)
    assert main(["--json", "verify", str(files["legacy"])]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {f["code"] for f in doc["findings"]} == {"mmproj.post-attention-norm"}


def test_names_follow_gguf_py_except_the_post_attention_norm(scout_dir: Path) -> None:
    from toolbox.checkpoint import load_checkpoint

    inv = load_checkpoint(scout_dir).expected_tensors()
    ours = names.name_map(list(inv))
    assert len(ours) == 42 and len(set(ours.values())) == 42
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 3)  # >= 3 blocks, or vision_adapter fc2 is unmapped
    differ = {}
    for hf, gg in ours.items():
        module, leaf = (hf, "") if hf.endswith(("class_embedding", "positional_embedding_vlm")) else hf.rsplit(".", 1)
        theirs = m.get_name(module)
        theirs = f"{theirs}.{leaf}" if leaf else theirs
        if hf.endswith("positional_embedding_vlm"):
            theirs += ".weight"  # llama.cpp's Llama4VisionModel appends it; the runtime reads it so
        if theirs != gg:
            differ[hf] = (gg, theirs)
    assert {k.split(".")[-2] if "layers" in k else k for k in differ} == {
        "post_attention_layernorm", "multi_modal_projector.linear_1.weight"}
    assert differ["multi_modal_projector.linear_1.weight"][0] == "mm.model.fc.weight"  # what the llama4 graph reads


def test_mmproj_layout_and_stamp(files, scout_dir: Path) -> None:
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(files["q8_0"])
    assert g.architecture == "clip" and g.get("general.type") == "mmproj"
    assert g.get("clip.projector_type") == "llama4" and g.get("clip.has_vision_encoder") is True
    cfg = json.loads((scout_dir / "config.json").read_text())
    vc = cfg["vision_config"]
    assert g.get("clip.vision.projection_dim") == cfg["text_config"]["hidden_size"]
    assert g.get("clip.vision.projector.scale_factor") == round(1 / vc["pixel_shuffle_ratio"])
    assert (g.get("clip.vision.image_size"), g.get("clip.vision.patch_size")) == (vc["image_size"], vc["patch_size"])
    types = {n: g.type_name(n) for n in g.tensors}
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == "F32"
    assert types["v.blk.0.attn_q.weight"] == types["mm.model.fc.weight"] == "Q8_0"
    assert all(types[n] == "F32" for n in g.tensors if len(g.shape(n)) == 1)
    assert g.get("general.name") == "Llama-4-Scout-demo-mmproj-q8_0"
    assert g.get(K.MULTIMODAL) == "true" and "European Union" in g.get(K.MULTIMODAL_RESTRICTION)
    report = check_artifact(files["q8_0"])
    assert report.is_llama and report.multimodal and report.findings == [], report.findings


def test_cli_inspect_verify_license_on_mmproj(files, capsys) -> None:
    assert main(["--json", "inspect", str(files["f16"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "clip" and info["mmproj"]["post_attention_norm"] == "ln2"
    assert info["mmproj"]["vision"]["image_size"] == SIDE
    assert main(["verify", str(files["f16"])]) == 0
    assert main(["license", "check", str(files["f16"])]) == 0
    assert "COMPLIANT" in capsys.readouterr().out


def test_text_gguf_plus_mmproj_back_to_hf(files, scout_dir: Path, image, tmp_path: Path) -> None:
    """f32 mmproj merged back: every tensor bit-exact, vision_config restored, transformers loads the full
    Llama4ForConditionalGeneration and its image embeddings equal the original's exactly."""
    out = tmp_path / "back"
    res = convert_gguf_to_hf(files["text"], out, mmproj=files["f32"], dtype="f32", mau_declaration=DECL)
    orig, back = _load_dir(scout_dir), _load_dir(out)
    assert back.keys() == orig.keys() and res.tensors == len(orig)
    assert all(back[n].dtype == torch.float32 and torch.equal(back[n], orig[n].float()) for n in orig)
    cfg, src_cfg = (json.loads((d / "config.json").read_text()) for d in (out, scout_dir))
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    assert cfg["vision_config"] == src_cfg["vision_config"]
    assert cfg["image_token_index"] == src_cfg["image_token_index"]
    model = Llama4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ref = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32)
    assert np.array_equal(_hf_embeddings(model, image), _hf_embeddings(ref, image))
    report = check_artifact(out)
    assert report.multimodal and report.findings == [], report.findings


@pytest.mark.parametrize("which", ["bf16", "legacy"])
def test_mmproj_reads_back_bit_exact(which: str, files, scout_dir: Path) -> None:
    """bf16 (weights stored as bf16, vectors as F32) and a file in llama.cpp's converter's layout with no
    corral config: the vision config comes from clip.* keys, attn_post_norm goes back to post_attention_layernorm."""
    mm = MmprojFile(files[which])
    src_cfg = json.loads((scout_dir / "config.json").read_text())
    vc = mm.vision_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "pixel_shuffle_ratio", "projector_input_dim", "projector_output_dim",
                "vision_output_dim", "norm_eps"):
        assert vc[key] == src_cfg["vision_config"][key], key
    assert (mm.stored is None) == (which == "legacy")
    orig = {n: t for n, t in _load_dir(scout_dir).items() if names.is_vision_name(n)}
    where = mm.gguf_names(list(orig))
    assert any(".attn_post_norm." in gg for gg in where.values()) == (which == "legacy")
    for n, t in orig.items():
        assert torch.equal(mm.load(where[n]).reshape(t.shape).to(torch.bfloat16), t), n
    full = mm.full_config({**src_cfg["text_config"]})
    assert full["architectures"] == ["Llama4ForConditionalGeneration"]
    assert full["boi_token_index"] == src_cfg["boi_token_index"]


def test_refusals_leave_nothing(files, scout_dir: Path, scout_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.mmproj.gguf"
    with pytest.raises(UsageError):
        convert_hf_to_mmproj(scout_dir, out, outtype="q4_k_m", mau_declaration=DECL)
    with pytest.raises(OutputExistsError):
        convert_hf_to_mmproj(scout_dir, files["f16"], mau_declaration=DECL)
    cfg = json.loads((scout_copy / "config.json").read_text())
    cfg["vision_config"]["rope_parameters"]["rope_theta"] = 20000.0
    (scout_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rope_theta"):
        convert_hf_to_mmproj(scout_copy, out, mau_declaration=DECL)
    res = convert_hf_to_mmproj(scout_copy, out, mau_declaration=DECL, allow_lossy_config=True)
    assert res.warnings and out.is_file()
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    tc = {**cfg["text_config"], "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text"}
    (text_only / "config.json").write_text(json.dumps(tc))
    with pytest.raises(UnsupportedModelError, match="no vision tower"):
        convert_hf_to_mmproj(text_only, tmp_path / "y.mmproj.gguf", mau_declaration=DECL)
    other = tmp_path / "other.mmproj.gguf"  # another model's projector
    writer = gguf.GGUFWriter(other, "clip")
    writer.add_clip_projector_type("gemma3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="not a Llama 4 mmproj"):
        MmprojFile(other)
    other.unlink()
    wide = {**cfg["text_config"], "hidden_size": 128}
    with pytest.raises(BadInputError, match="width"):
        MmprojFile(files["f16"]).full_config(wide)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scout", "text-only", "x.mmproj.gguf"]


def test_failure_mid_write_leaves_no_file(scout_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real, calls = gguf_mmproj.encode, []

    def failing(t: torch.Tensor, qtype: str) -> memoryview:
        calls.append(qtype)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(t, qtype)

    monkeypatch.setattr(gguf_mmproj, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_mmproj(scout_dir, tmp_path / "m.mmproj.gguf", mau_declaration=DECL)
    assert list(tmp_path.iterdir()) == []


def test_real_scout_and_maverick_vision_fit_llama_cpp_and_auto_type(scout_dir: Path, tmp_path: Path) -> None:
    from real_configs import maverick_config, scout_config

    from toolbox.checkpoint import from_config

    for cfg in (scout_config(), maverick_config()):
        assert gguf_mmproj.llama_cpp_vision_problems(from_config(cfg)) == []
    res = convert_hf_to_mmproj(scout_dir, tmp_path / "a.mmproj.gguf", outtype="auto", mau_declaration=DECL)
    assert res.outtype == "BF16" and res.name.endswith("mmproj-bf16")  # the demo's weights are bf16
    assert [gguf_mmproj.mmproj_outtype_for(t) for t in ("q8_0", "bf16", "q4_k_m", "auto")] == [
        "q8_0", "bf16", "f16", "auto"]
    assert gguf_mmproj.mmproj_path_for("out/model-q4_k_m.gguf") == Path("out/model-q4_k_m.mmproj.gguf")


def test_verify_against_compares_the_vision_tower(files, scout_dir: Path, capsys) -> None:
    from toolbox.verify.checks import verify_checkpoint

    for which in ("f32", "q8_0"):
        report = verify_checkpoint(files[which], against=scout_dir)
        assert [f for f in report.findings if f.severity != "info"] == [], report.findings
        stats = report.tensor_stats
        assert stats and all(n.startswith(("vision_model.", "multi_modal_projector.")) for n in stats)
        if which == "f32":  # the demo is bf16: f32 holds it exactly
            assert all(s["max_abs_error"] == 0 for s in stats.values())
    # the legacy (llama.cpp-converter) file stores the same numbers under other names: still compared
    assert main(["--json", "verify", str(files["legacy"]), "--against", str(scout_dir)]) == 1  # its norm finding
    doc = json.loads(capsys.readouterr().out)
    assert not [f for f in doc["findings"] if f["code"].startswith("against.") and f["severity"] != "info"]


def test_cli_writes_the_pair_and_merges_it_back(scout_dir: Path, tmp_path: Path, capsys) -> None:
    pair = tmp_path / "pair"
    pair.mkdir()
    text = pair / "Llama-4-Scout-demo.gguf"
    assert main(["--json", "convert", str(scout_dir), "--to", "gguf", "--outtype", "q8_0", "-o", str(text),
                 "--mmproj", "auto", "--mau-declaration", DECL]) == 0
    doc = json.loads(capsys.readouterr().out)
    mm = pair / "Llama-4-Scout-demo.mmproj.gguf"
    assert doc["mmproj"]["path"] == str(mm) and doc["mmproj"]["outtype"] == "Q8_0"
    assert sorted(p.name for p in pair.iterdir()) == sorted([mm.name, text.name])
    # each file passes the audit on its own metadata; the pair carries one name and the multimodal obligations
    from toolbox.tensors.gguf.reader import read_gguf_kv

    assert main(["license", "check", str(text)]) == 0 and main(["license", "check", str(mm)]) == 0
    kv_text, kv_mm = read_gguf_kv(text), read_gguf_kv(mm)
    assert kv_text["general.name"] == kv_mm["general.name"]
    assert kv_text["corral.model.multimodal"] == kv_mm["corral.model.multimodal"] == "true"
    capsys.readouterr()
    back = tmp_path / "back"
    assert main(["convert", str(text), "--to", "hf", "--mmproj", str(mm), "-o", str(back),
                 "--mau-declaration", DECL]) == 0
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"] and "vision_config" in config
    assert main(["license", "check", str(back)]) == 0
    # an existing mmproj is refused before any work: the text file is not written either
    again = tmp_path / "again.gguf"
    (tmp_path / "again.mmproj.gguf").write_bytes(b"x")
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(again), "--mmproj", "auto",
                 "--mau-declaration", DECL]) == 2
    assert not again.exists()


def test_cli_pair_is_refused_before_the_text_file_is_written(scout_copy: Path, tmp_path: Path) -> None:
    """A vision config llama.cpp cannot run stops `--mmproj auto` before either file exists."""
    cfg = json.loads((scout_copy / "config.json").read_text())
    cfg["vision_config"]["rope_theta"] = 20000.0
    cfg["vision_config"].setdefault("rope_parameters", {})["rope_theta"] = 20000.0
    (scout_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pair.gguf"
    assert main(["convert", str(scout_copy), "--to", "gguf", "-o", str(out), "--mmproj", "auto",
                 "--mau-declaration", DECL]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scout"]  # no text GGUF, no mmproj, no staging
