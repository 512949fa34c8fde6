"""Block-wise int4/int8 weight quantization in onnxruntime's MatMulNBits / QMoE layout, in numpy.

The layout is the one onnxruntime's contrib op schema defines for com.microsoft::MatMulNBits: a
weight used as `x @ W` with W of shape [K, N] is stored per output feature n as K/block_size blocks
of `block_size * bits / 8` bytes (B: uint8 [N, K/block, blob]), element k of a block in the low
nibble first (4 bits); one scale per block (scales [N, K/block]); with zero points (asymmetric),
uint8 [N, ceil(K/block * bits / 8)] packed the same way, else the implied zero point 2^(bits-1).
QMoE takes the same bytes per expert as [E, N, K * bits / 8].

The scale and rounding rules are MLAS's (onnxruntime/core/mlas/lib/q4_dq.cpp, `range2scale`,
`range2scalezp`): symmetric: the block value of largest magnitude m gives scale = -m / 2^(bits-1);
asymmetric: the range widened to include 0, scale = range / (2^bits - 1), zero point rounded and
clamped; codes are round(v * (1 / scale) + zero point), rounding halves away from zero (C's roundf:
bf16 weights hit exact halves often, where round-half-even would differ). tests/test_onnx_genai.py
checks equality with onnxruntime's own `quantize_matmul_4bits` and `quantize_matmul_8bits`. Rows are
independent, so callers quantize a weight a few rows (or one expert) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantized:
    """One weight (or a block of its rows) quantized: B [N, K/block, blob], scales [N, K/block], zero points."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8 [N, ceil(K/block * bits / 8)]; None when symmetric


def blob_bytes(bits: int, block: int) -> int:
    return block * bits // 8


def zero_point_bytes(blocks: int, bits: int) -> int:
    return (blocks * bits + 7) // 8


def _round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, as C's roundf."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes: two 4-bit codes per byte (first in the low nibble), or as is (8 bits)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), dtype=q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_rows(w: np.ndarray, bits: int, block: int, symmetric: bool) -> Quantized:
    """Quantize W^T given as rows: `w` is [N, K] (an nn.Linear weight: one row per output feature)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    blocks = w.reshape(n, k // block, block).astype(np.float32, copy=False)
    lo, hi = blocks.min(-1), blocks.max(-1)
    top = np.float32(2**bits - 1)
    if symmetric:
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (-m / np.float32(2 ** (bits - 1))).astype(np.float32)
        zero = np.full(scales.shape, 2 ** (bits - 1), dtype=np.float32)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scales = ((hi - lo) / top).astype(np.float32)
        safe = np.where(scales != 0, scales, np.float32(1))
        zero = np.clip(_round(np.where(scales != 0, -lo / safe, lo)), 0, top).astype(np.float32)
    recip = np.where(scales != 0, np.float32(1) / np.where(scales != 0, scales, np.float32(1)), np.float32(0))
    codes = np.clip(_round((blocks * recip[..., None] + zero[..., None]).astype(np.float32)), 0, top
                    ).astype(np.uint8)
    zp = None if symmetric else _pack(zero.astype(np.uint8), bits)
    return Quantized(_pack(codes, bits), scales, zp)

