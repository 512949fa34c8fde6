"""GGUF tensor encodings, computed on row slices so memory stays bounded.

F32/F16/BF16 are plain casts. Q8_0 is ggml's kernel when llama-cpp-python is installed (row blocks on
every core, converted from bf16 in cache, no float32 copy of a piece), else a torch twin; both are
bit-exact with gguf-py's numpy reference (checked in tests), which is single-threaded.
The other types gguf-py implements are computed by gguf-py on row groups in a thread pool
(numpy releases the GIL in its kernels). K- and I-quants (every other ggml type) are encoded
in-process by ggml's own kernels (`toolbox.tensors.gguf.ggml`).

Every encoding checks that it did not create non-finite values (toolbox.tensors.finite): F32 ->
F16 overflows to Inf above 65504, and the F16 block scales of Q8_0/Q4_x/Q5_x/TQx_0 overflow when a
block's largest magnitude passes ~65504 times the type's code range. `encode` then raises
NonFiniteError (exit 3); the GGUF writer names the tensor and the caller removes its partial.
Values already NaN/Inf in the source are carried as the encoding carries them, not refused.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from toolbox.tensors.finite import NonFiniteError, check_cast, overflow

__all__ = ["NonFiniteError", "decode", "encode"]

if TYPE_CHECKING:
    import numpy as np
    import torch

# corral --outtype name -> gguf GGMLQuantizationType name, for types computed in Python
PY_OUTTYPES = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
    "q5_0": "Q5_0", "q5_1": "Q5_1", "tq1_0": "TQ1_0", "tq2_0": "TQ2_0", "mxfp4": "MXFP4",
}
# corral --outtype name -> llama.cpp LLAMA_FTYPE_MOSTLY_* suffix, for llama.cpp's quantization mixes
# (per-tensor types: converters/gguf_mix.yaml; encoded in-process by ggml, toolbox.tensors.gguf.ggml)
LLAMA_CPP_OUTTYPES = {
    "q2_k": "Q2_K", "q2_k_s": "Q2_K_S", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
    "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
    "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL", "iq3_s": "IQ3_S", "iq3_m": "IQ3_M", "iq3_xs": "IQ3_XS",
    "iq3_xxs": "IQ3_XXS", "iq2_m": "IQ2_M", "iq2_s": "IQ2_S", "iq2_xs": "IQ2_XS", "iq2_xxs": "IQ2_XXS",
    "iq1_m": "IQ1_M", "iq1_s": "IQ1_S", "mxfp4_moe": "MXFP4_MOE",
}
ALL_OUTTYPES = ("auto", *PY_OUTTYPES, *LLAMA_CPP_OUTTYPES)
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
MMPROJ_OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")  # the vision projector's: auto keeps its float type


def qtype(name: str) -> Any:
    import gguf

    return getattr(gguf.GGMLQuantizationType, name)


def block_info(qtype_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[qtype(qtype_name)]


def can_encode(qtype_name: str, row_len: int) -> bool:
    block, _ = block_info(qtype_name)
    return row_len % block == 0


def nbytes(qtype_name: str, shape: tuple[int, ...]) -> int:
    block, size = block_info(qtype_name)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


BELOW_HALF = 0.49999997  # the float32 just below 0.5


def _round_to_int8(v: torch.Tensor) -> torch.Tensor:
    """gguf-py's np_roundf (round half away from zero) of float32 values in (-127.5, 127.5), as int8.

    trunc(v + copysign(0.49999997, v)) equals it for every float32 below 2**23: with exactly 0.5 the
    sum would round up for v = 0.49999997 itself; with the float just below, ties still reach the next
    integer (the sum rounds up to it) and nothing else does (tests compare with gguf-py on ties and
    near-ties). The cast to int8 truncates: three passes instead of np_roundf's eight.
    """
    import torch

    return v.add_(torch.full_like(v, BELOW_HALF).copysign_(v)).to(torch.int8)


Q8_CHUNK_BLOCKS = 16384  # 512 Ki elements: each temporary stays in cache (8x faster than whole-tensor ops)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (f16 scale + 32 int8) of a float32 [..., n] tensor, as uint8 bytes."""
    import torch

    blocks = x.reshape(-1, 32)
    out = torch.empty((blocks.shape[0], 34), dtype=torch.uint8)
    for s in range(0, blocks.shape[0], Q8_CHUNK_BLOCKS):
        b = blocks[s:s + Q8_CHUNK_BLOCKS]
        d = b.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        out[s:s + Q8_CHUNK_BLOCKS, :2] = d.to(torch.float16).view(torch.uint8)
        out[s:s + Q8_CHUNK_BLOCKS, 2:] = _round_to_int8(b * inv).view(torch.uint8)
    return out.reshape(-1)


def _gguf_py(x: np.ndarray, name: str, workers: int) -> np.ndarray:
    import numpy as np

    rows = x.reshape(-1, x.shape[-1])
    groups = np.array_split(rows, max(1, min(workers * 4, rows.shape[0])))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda g: _quantize_quietly(g, name), groups))
    return np.concatenate(parts)


# block bytes and the byte offsets of its float16 scale fields, for the types computed here
F16_SCALES: dict[str, tuple[int, tuple[int, ...]]] = {
    "Q8_0": (34, (0,)), "Q4_0": (18, (0,)), "Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)),
    "TQ1_0": (54, (52,)), "TQ2_0": (66, (64,)),
}


def _quantize_quietly(rows: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's quantize without numpy's overflow warnings (per thread): `_check_finite` reports them."""
    import gguf
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        return gguf.quants.quantize(rows, qtype(name)).reshape(-1)


def encode(t: torch.Tensor, qtype_name: str, *, workers: int = 2) -> memoryview:
    """The bytes of `t` (rows along the last dim) in GGUF type `qtype_name`.

    `t` may be a strided view (a transposed expert slice): ggml reads it in tiles, the other encodings
    get a cache-blocked transposed copy. NonFiniteError when the encoding creates Inf/NaN that `t` does
    not hold (see the module docstring)."""
    import numpy as np
    import torch

    if qtype_name == "Q8_0":
        return memoryview(_q8_0_encode(t))
    if qtype_name not in PY_OUTTYPES.values():  # K-, I-quants and the rest: ggml's own kernels, all cores
        from toolbox.tensors.gguf import ggml

        return memoryview(ggml.quantize(t, qtype_name))
    t = dense(t)
    if qtype_name == "F32":
        out = t.to(torch.float32)
    elif qtype_name == "F16":
        out = t.to(torch.float16)
    elif qtype_name == "BF16":
        out = t.to(torch.bfloat16)
    else:
        arr = _gguf_py(t.to(torch.float32).numpy(), qtype_name, workers)
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        _check_finite(t, qtype_name, torch.from_numpy(raw))
        return memoryview(raw)
    _check_finite(t, qtype_name, out)
    return memoryview(out.contiguous().view(torch.uint8).reshape(-1).numpy())


def dense(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous; a transposed 2-D view through the cache-blocked transpose (twice as fast as torch's)."""
    if t.is_contiguous():
        return t
    if t.dim() == 2 and t.stride(0) == 1:
        from toolbox.tensors.transpose import transpose2d

        return transpose2d(t.T)
    return t.contiguous()


def _q8_0_encode(t: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes of `t`: ggml's quantize_row_q8_0_ref when llama-cpp-python is there (one core per row block,
    straight from bf16 and strided views), else the torch twin; the two are byte-identical on finite rows
    (tests). Row blocks holding NaN/Inf go through the torch twin either way, which carries them as gguf-py
    does (ggml's max() drops a NaN)."""
    import numpy as np
    import torch

    from toolbox.tensors.gguf import ggml

    if not ggml.available():
        raw = q8_0(dense(t).to(torch.float32)).numpy()
    else:
        raw = ggml.quantize(t, "Q8_0", carry=lambda rows: q8_0(torch.from_numpy(rows)).numpy())
    # the f16 block scales, read in place (a strided view: a copy of them first cost 5x as much)
    if not np.isfinite(raw.view(np.float16).reshape(-1, 17)[:, 0]).all():
        _check_finite(t, "Q8_0", torch.from_numpy(raw))  # raises unless the source was already non-finite
    return raw


def _check_finite(t: torch.Tensor, qtype_name: str, out: torch.Tensor) -> None:
    """Raise NonFiniteError when `out` (the encoding of `t`) holds Inf/NaN and `t` holds none."""
    import torch

    if qtype_name in FLOAT_TYPES:
        check_cast(t, out)
        return
    if qtype_name not in F16_SCALES:
        return  # MXFP4: a power-of-two scale covers every finite float32
    block, offsets = F16_SCALES[qtype_name]
    blocks = out.reshape(-1, block)
    if all(bool(torch.isfinite(blocks[:, o:o + 2].contiguous().view(torch.float16)).all()) for o in offsets):
        return
    if not bool(torch.isfinite(t).all()):
        return  # already non-finite in the source: carried, not created
    raise overflow(f"encoding to {qtype_name} needs a block scale beyond float16's range (65504)", t, None)


def decode(raw: np.ndarray, qtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float tensor (float32, or bf16 for BF16) from GGUF raw bytes of the given element shape."""
    import gguf
    import numpy as np
    import torch

    if qtype_name == "BF16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    if qtype_name == "F32":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).copy()).reshape(shape)
    if qtype_name == "F16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).copy()).reshape(shape)
    deq = gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype(qtype_name))
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(shape)
