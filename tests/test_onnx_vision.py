"""convert --to onnx --vision: vision.onnx against transformers' image features, an image + text prompt end to
end in onnxruntime against transformers' logits and greedy tokens, verify and the license audit on the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from license.stamp import LicenseOptions

LICENSE = LicenseOptions(mau_declaration="below-700m")


def _reference(model_dir: Path):
    import torch
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_features(hf, pixel_values: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        feats = hf.get_image_features(torch.tensor(pixel_values), return_dict=True).last_hidden_state
        return hf.multi_modal_projector(feats).numpy()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    from toolbox.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp("vision") / "scout-onnx"
    result = convert(ConvertRequest(source=scout_dir, to="onnx", output=out, vision=True, license=LICENSE))
    assert result.data["vision"]["tokens_per_tile"] == 4 and result.paths[-1] == out / "vision.onnx"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_vision_onnx_matches_transformers(variant: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import onnxruntime as ort

    from converters.onnx_vision import export_vision
    from toolbox.reference import resolve

    model_dir = request.getfixturevalue(f"{variant}_dir")
    res = export_vision(resolve(model_dir), tmp_path, license_options=LICENSE)
    session = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["tiles", 3, 56, 56]  # the tile axis is dynamic
    pixels = np.random.default_rng(1).standard_normal((3, 3, 56, 56)).astype(np.float32)
    got = session.run(None, {"pixel_values": pixels})[0]
    want = _hf_features(_reference(model_dir), pixels)
    assert got.shape == want.shape == (3, 4, 64)
    assert np.abs(got - want).max() < 1e-4
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert settings["size"] == {"height": 56, "width": 56} and settings["patch_size"] == 14
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["corral.model.multimodal"] == "true" and "corral.license.multimodal_restriction" in meta


@pytest.mark.slow
def test_image_and_text_prompt_end_to_end(export: Path, scout_dir: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from toolbox.runtime.onnx_vision import OnnxVisionModel

    model = OnnxVisionModel(export)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 120, 3), dtype=np.uint8))
    pixels, aspect = model.pixel_values(image)
    assert aspect == (2, 3) and pixels.shape == (7, 3, 56, 56)  # 2 x 3 tiles + the global one
    tok = AutoTokenizer.from_pretrained(export)
    prompt = (f"<|header_start|>user<|header_end|>\n\n{model.image_prompt(aspect)}What is this?<|eot|>"
              "<|header_start|>assistant<|header_end|>\n\n")
    ids = np.array([tok(prompt).input_ids])
    tokens, logits = model.generate(ids, pixels, 4)
    hf = _reference(scout_dir)
    assert np.abs(model.image_features(pixels) - _hf_features(hf, pixels)).max() < 1e-4
    seq = torch.tensor(ids)
    with torch.no_grad():
        want = hf(input_ids=seq, pixel_values=torch.tensor(pixels)).logits.numpy()
        for _ in range(4):  # plain greedy argmax, no cache: the reference recomputes everything
            nxt = hf(input_ids=seq, pixel_values=torch.tensor(pixels)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert np.abs(logits - want).max() < 1e-4
    assert tokens == seq[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_verify_and_license_check_the_vision_export(export: Path) -> None:
    from license.audit import check_artifact
    from toolbox.verify.checks import verify_checkpoint

    report = verify_checkpoint(export)
    assert report.checked.get("vision") is True and not report.findings, report.findings
    findings = [f for f in check_artifact(export).findings if f.severity in ("error", "fatal")]
    assert not findings, findings


def test_image_prompt_matches_transformers_processor() -> None:
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    from toolbox.runtime.llama4_image import image_prompt

    for aspect in [(1, 1), (2, 3), (4, 1)]:  # _prompt_split_image reads nothing from the processor itself
        assert image_prompt(aspect, 4) == Llama4Processor._prompt_split_image(None, aspect, 4)


def test_pillow_preprocessing_of_an_exact_tile(scout_dir: Path) -> None:
    """A 56 x 56 image is one tile, not resized: (x / 255 - 0.5) / 0.5, rounded to bfloat16 as transformers does."""
    import torch
    from PIL import Image

    from converters.onnx_vision import processor_settings
    from toolbox.checkpoint import read_config
    from toolbox.runtime.llama4_image import preprocess

    pixels = np.random.default_rng(2).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    got, aspect = preprocess(Image.fromarray(pixels), processor_settings(scout_dir, read_config(scout_dir)))
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(torch.bfloat16) * (1 / 255)
    want = ((x - 0.5) / 0.5).float().numpy()
    assert aspect == (1, 1) and got.shape == (1, 3, 56, 56)
    np.testing.assert_array_equal(got[0], want)


def test_text_only_config_is_refused_before_work() -> None:
    from converters.onnx_vision import vision_layout
    from toolbox.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="no vision encoder"):
        vision_layout({"architectures": ["Llama4ForCausalLM"], "hidden_size": 64})
