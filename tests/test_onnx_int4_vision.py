"""convert --to onnx --dtype int4 --vision: the vision tower stays fp32 (it is ~1% of Scout's weights and
its features feed every image token, so quantizing it buys little disk for a large error), the text
decoder is int4 in model.onnx and in decoder_embeds.onnx. References: transformers on the original weights
(image features) and on the same weights quantized by onnxruntime's quantizer and dequantized in numpy
(what the int4 graph must compute; the bound is the text int4 test's: fp32 activations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from license.stamp import LicenseOptions

LICENSE = LicenseOptions(mau_declaration="below-700m")


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    from toolbox.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp("int4-vision") / "scout-int4"
    result = convert(ConvertRequest(source=scout_dir, to="onnx", output=out, vision=True, dtype="int4",
                                    license=LICENSE))
    assert result.data["vision"]["dtype"] == "fp32" and not result.warnings, result.warnings
    return out


def _reference(model_dir: Path):
    import torch
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.slow
def test_int4_vision_export_matches_transformers(int4_export: Path, scout_dir: Path, tmp_path: Path,
                                                 record_property) -> None:
    import torch
    from onnx_quant_ref import fake_quant_checkpoint
    from PIL import Image
    from transformers import AutoTokenizer

    from toolbox.runtime.onnx_vision import OnnxVisionModel

    ops = {n.op_type for n in onnx.load(str(int4_export / "decoder_embeds.onnx"), load_external_data=False).graph.node}
    assert {"MatMulNBits", "QMoE"} <= ops  # the image path runs the int4 decoder, not a float copy
    data = int4_export / "model.onnx.data"
    before = data.stat().st_size
    model = OnnxVisionModel(int4_export)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 120, 3), dtype=np.uint8))
    pixels, aspect = model.pixel_values(image)
    tok = AutoTokenizer.from_pretrained(int4_export)
    prompt = (f"<|header_start|>user<|header_end|>\n\n{model.image_prompt(aspect)}What is this?<|eot|>"
              "<|header_start|>assistant<|header_end|>\n\n")
    ids = np.array([tok(prompt).input_ids])
    tokens, logits = model.generate(ids, pixels, 4)
    hf = _reference(scout_dir)
    quant = _reference(fake_quant_checkpoint(scout_dir, tmp_path / "fake", int4_export))
    with torch.no_grad():
        feats = hf.multi_modal_projector(hf.get_image_features(torch.tensor(pixels), return_dict=True)
                                         .last_hidden_state).numpy()
        assert np.abs(model.image_features(pixels) - feats).max() < 1e-4  # fp32 tower: the fp32 export's bound
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
        seq = torch.tensor(ids)
        want = quant(input_ids=seq, pixel_values=torch.tensor(pixels)).logits.numpy()
        for _ in range(4):  # greedy on the dequantized weights, no cache
            nxt = quant(input_ids=seq, pixel_values=torch.tensor(pixels)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    np.testing.assert_allclose(logits, want, atol=2e-3 * np.abs(want).max())
    assert tokens == seq[0, ids.shape[1]:].tolist()
    agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
    expected = float((want.argmax(-1) == ref.argmax(-1)).mean())  # what the quantization error alone allows
    record_property("int4_vision_top1_agreement", agree)
    print(f"int4 + image: top-1 agreement with transformers {agree:.3f} over {ids.shape[1]} positions "
          f"(onnxruntime-quantized weights in transformers: {expected:.3f})")
    assert agree >= expected - 1.5 / ids.shape[1]
    assert data.stat().st_size == before  # embedding.onnx and decoder_embeds.onnx point into model.onnx.data
