"""GGUF -> ONNX and ONNX -> GGUF (streamed, converters/gguf_onnx.py): each runtime gives the other's logits."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import Llama4ForConditionalGeneration

from license.stamp import LicenseOptions
from toolbox.cli.main import main
from toolbox.convert import ConvertRequest, convert
from toolbox.runtime.onnx_decoder import OnnxDecoder

DECL = LicenseOptions(mau_declaration="below-700m")
IDS = [200000, 50, 300, 7, 999, 42, 1234, 88]


def _cpp(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


def _ort(path: Path) -> np.ndarray:
    ids = np.array([IDS])
    logits, _ = OnnxDecoder(path).run(ids, np.ones_like(ids), np.arange(len(IDS))[None])
    return logits[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _no_partials(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if "corral-partial" in p.name or "corral-new" in p.name]


@pytest.mark.slow
def test_gguf_to_onnx_runs_like_llama_cpp(scout_dir: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "s.gguf"
    convert(ConvertRequest("demo:scout", "gguf", gguf, outtype="f32", license=DECL))
    res = convert(ConvertRequest(gguf, "onnx", tmp_path / "onnx", license=DECL))
    assert res.data["dtype"] == "fp32" and res.data["kv_cache"]
    _no_partials(tmp_path)
    got, cpp = _ort(tmp_path / "onnx"), _cpp(gguf)
    assert _rel(got, cpp) < 2e-3  # as for every f32 GGUF against transformers
    model = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)  # the f32 GGUF held the weights exactly
    assert main(["license", "check", str(tmp_path / "onnx")]) == 0


@pytest.mark.slow
def test_onnx_to_gguf_runs_like_onnxruntime(tmp_path: Path, capsys) -> None:
    convert(ConvertRequest("demo:maverick", "onnx", tmp_path / "onnx", license=DECL))
    assert main(["--json", "convert", str(tmp_path / "onnx"), "--to", "gguf", "--outtype", "f32",
                 "-o", str(tmp_path / "m.gguf"), "--mau-declaration", "below-700m"]) == 0
    capsys.readouterr()
    _no_partials(tmp_path)
    assert _rel(_cpp(tmp_path / "m.gguf"), _ort(tmp_path / "onnx")) < 2e-3
    # a refused option leaves neither the output nor a staged checkpoint
    assert main(["convert", str(tmp_path / "onnx"), "--to", "gguf", "--outtype", "no_such_type",
                 "-o", str(tmp_path / "x.gguf")]) == 2
    assert not (tmp_path / "x.gguf").exists()
    _no_partials(tmp_path)
