"""References for int4/int8 ONNX tests: weights quantized by onnxruntime's own block quantizer and
dequantized in numpy, i.e. what a correct MatMulNBits/QMoE graph must compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from safetensors.torch import load_file, save_file

from converters.onnx_export import KEY_QUANT


def ort_quantize(w_kn: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, ...]:
    """onnxruntime's quantizer on a [K, N] weight: (B [N, K/block, blob], scales [N, K/block], zero points)."""
    k, n = w_kn.shape
    kb = k // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb * bits + 7) // 8), np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(
        packed, np.ascontiguousarray(w_kn, np.float32), scales, zp, block, n, k, symmetric)
    return packed, scales, zp


def fake_quant(w_kn: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """The [K, N] weight that onnxruntime's quantized bytes stand for, dequantized in numpy."""
    packed, scales, zp = ort_quantize(w_kn, bits, block, symmetric)
    n, kb, _ = packed.shape
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, kb, block) if bits == 4 else packed
    if symmetric:
        zero = np.full((n, kb), 2 ** (bits - 1), np.float32)
    else:
        zero = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1) if bits == 4 else zp)[:, :kb].astype(np.float32)
    return ((codes.astype(np.float32) - zero[..., None]) * scales[..., None]).reshape(n, kb * block).T


def fake_quant_checkpoint(src: Path, dst: Path, export: Path) -> Path:
    """A copy of `src` whose weights that the export packs are replaced by onnxruntime-quantized ones (f32)."""
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    doc = json.loads(next(p.value for p in model.metadata_props if p.key == KEY_QUANT))
    bits, block, sym = doc["config"]["bits"], doc["config"]["block_size"], doc["config"]["symmetric"]
    sources = {entry[0] for entry in doc["tensors"].values()}
    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in sources & tensors.keys():
            w = tensors[name].float().numpy()
            if w.ndim == 2:  # nn.Linear [N, K]: y = x @ W^T
                q = fake_quant(w.T, bits, block, sym).T
            else:  # fused experts [E, K, N]: y = x @ W[e]
                q = np.stack([fake_quant(w[e], bits, block, sym) for e in range(w.shape[0])])
            tensors[name] = torch.from_numpy(np.ascontiguousarray(q))
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst
