"""int4/int8 ONNX (MatMulNBits + QMoE) and onnxruntime-genai, checked by their real consumers.

References: onnxruntime's own block quantizer (`quantize_matmul_4bits` / `_8bits`) for the packing,
onnxruntime-genai's generation loop, transformers on the original weights and on the same weights
quantized by onnxruntime's quantizer and dequantized here in numpy (what a correct int4/int8 graph
must compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_quant_ref import fake_quant_checkpoint, ort_quantize  # onnxruntime's quantizer, dequantized in numpy
from transformers import AutoTokenizer, Llama4ForConditionalGeneration

from converters.onnx_export import convert_hf_to_onnx
from toolbox.cli.main import main
from toolbox.runtime.genai_decoder import GenaiDecoder
from toolbox.runtime.onnx_decoder import OnnxDecoder
from toolbox.tensors.onnx_nbits import quantize_rows

DECL = "below-700m"
TEXT = ("The quick brown fox jumps over the lazy dog while the llama watches from the hill, "
        "counting experts one by one.")


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_packing_equals_onnxruntime_quantizer(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    # [N, K] as nn.Linear stores it; bf16-representable values (checkpoints are bf16) give exact halves to round
    w = torch.from_numpy(rng.standard_normal((48, 256)) * 0.05).to(torch.bfloat16).float().numpy()
    w[3, :32] = 0.0  # an all-zero block: scale 0
    ours = quantize_rows(w, bits, 32, symmetric)
    packed, scales, zp = ort_quantize(w.T, bits, 32, symmetric)
    assert np.array_equal(ours.data, packed) and np.array_equal(ours.scales, scales)
    assert ours.zero_points is None if symmetric else np.array_equal(ours.zero_points, zp)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, scout_dir: Path, maverick_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-genai")
    out = {"scout": root / "scout", "maverick": root / "maverick", "int4": root / "int4", "int8": root / "int8"}
    convert_hf_to_onnx(scout_dir, out["scout"], mau_declaration=DECL)
    convert_hf_to_onnx(maverick_dir, out["maverick"], mau_declaration=DECL)
    import converters.onnx_quant_weights as qw

    piece, qw.PIECE_FLOATS = qw.PIECE_FLOATS, 64 * 6  # int4: weights and experts quantized in blocks of 6 rows
    try:
        convert_hf_to_onnx(scout_dir, out["int4"], dtype="int4", mau_declaration=DECL)  # symmetric, block 32
    finally:
        qw.PIECE_FLOATS = piece
    convert_hf_to_onnx(scout_dir, out["int8"], dtype="int8", symmetric=False, mau_declaration=DECL)
    return out


def _prompt(d: Path) -> list[int]:
    return AutoTokenizer.from_pretrained(d)("Hello Llama 4!").input_ids


def _hf_greedy(src: Path, ids: list[int], steps: int) -> list[int]:
    model = Llama4ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_fp32_genai_greedy_matches_decoder_and_transformers(variant: str, exports: dict[str, Path],
                                                            scout_dir: Path, maverick_dir: Path) -> None:
    d = exports[variant]
    cfg = json.loads((d / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "llama" and cfg["model"]["decoder"]["num_key_value_heads"] == 2
    ids, steps = _prompt(d), 8
    genai = GenaiDecoder(d).generate(ids, steps)
    arr = np.array([ids])
    ort, _ = OnnxDecoder(d).greedy(arr, np.ones_like(arr), steps)
    hf = _hf_greedy(scout_dir if variant == "scout" else maverick_dir, ids, steps)
    assert len(genai) == steps and genai == ort[0].tolist() == hf


@pytest.mark.slow
def test_genai_sampling_uses_its_own_loop(exports: dict[str, Path]) -> None:
    d = exports["scout"]
    ids = _prompt(d)
    dec = GenaiDecoder(d)
    greedy = dec.generate(ids, 6)
    # top_k 1 leaves one candidate: sampling must give the greedy tokens
    assert dec.generate(ids, 6, do_sample=True, top_k=1, seed=3) == greedy
    a = dec.generate(ids, 12, do_sample=True, top_k=50, temperature=5.0, seed=7)
    b = dec.generate(ids, 12, do_sample=True, top_k=50, temperature=5.0, seed=7)
    c = dec.generate(ids, 12, do_sample=True, top_k=50, temperature=5.0, seed=8)
    assert a == b  # the same seed reproduces its draw
    assert a[:6] != greedy or c[:6] != greedy  # a hot sampler leaves the greedy path
    assert all(0 <= t < 202048 for t in a)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_quantized_next_token_agreement(dtype: str, exports: dict[str, Path], scout_dir: Path,
                                        tmp_path: Path, record_property) -> None:
    d = exports[dtype]
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "QMoE"} <= ops and "If" not in ops
    ids = np.array([AutoTokenizer.from_pretrained(d)(TEXT).input_ids])
    got, _ = OnnxDecoder(d).run(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    fake = fake_quant_checkpoint(scout_dir, tmp_path / "fake", d)
    with torch.no_grad():
        ref = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32).eval()(
            input_ids=torch.tensor(ids)).logits.numpy()
        want = Llama4ForConditionalGeneration.from_pretrained(fake, dtype=torch.float32).eval()(
            input_ids=torch.tensor(ids)).logits.numpy()
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    expected = float((want.argmax(-1) == ref.argmax(-1)).mean())  # what the quantization error alone allows
    record_property(f"{dtype}_top1_agreement", agree)
    print(f"{dtype}: top-1 agreement with transformers {agree:.3f} over {ids.shape[1]} positions "
          f"(the same weights quantized by onnxruntime, dequantized in numpy: {expected:.3f})")
    scale = np.abs(want).max()
    if dtype == "int4":  # fp32 activations (accuracy_level 0): the graph computes the dequantized weights' maths
        np.testing.assert_allclose(got, want, atol=2e-3 * scale)
        assert agree >= expected - 1.5 / ids.shape[1]
    else:  # QMoE's 8-bit experts quantize activations to int8 on CPU: near-exact, not exact
        assert np.abs(got - want).max() < 0.05 * scale
        assert agree >= 0.9 and agree >= expected - 0.1


@pytest.mark.slow
def test_verify_run_uses_genai_and_to_hf_refuses_int4(exports: dict[str, Path], tmp_path: Path, capsys) -> None:
    d = exports["int4"]
    capsys.readouterr()
    assert main(["--json", "verify", str(d), "--run"]) == 0
    report = json.loads(capsys.readouterr().out)
    run = report["checked"]["run"]
    assert report["ok"] and run["match"] and run["genai"] == run["onnxruntime"][: len(run["genai"])]
    assert run["transformers"] is None and report["checked"]["format"] == "onnx"
    assert main(["--json", "verify", str(exports["maverick"]), "--run"]) == 0
    run = json.loads(capsys.readouterr().out)["checked"]["run"]
    assert run["match"] and run["genai"] is not None and run["transformers"] == run["onnxruntime"]
    out = tmp_path / "back"
    assert main(["convert", str(d), "--to", "hf", "-o", str(out), "--mau-declaration", DECL]) == 3
    assert not out.exists()
    assert main(["license", "check", str(d)]) == 0
    embed = 202048 * 64 * 4  # kept float32 by default; the rest is packed: ~1/8 of fp32 plus scales
    int4, fp32 = ((e / "model.onnx.data").stat().st_size - embed for e in (d, exports["scout"]))
    assert int4 < 0.2 * fp32


@pytest.mark.parametrize("extra", [["--block-size", "48"], ["--accuracy-level", "9"], ["--keep-float", "norms"],
                                   ["--block-size", "128"]])  # 128 does not divide demo:scout's widths (64)
def test_cli_refuses_bad_quant_options(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "o"
    assert main(["convert", "demo:scout", "--to", "onnx", "--dtype", "int4", "-o", str(out),
                 "--mau-declaration", DECL, *extra]) == 3
    assert not out.exists() and not any(tmp_path.iterdir())
