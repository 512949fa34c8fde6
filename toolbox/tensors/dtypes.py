"""The one element-type table of the format floor: safetensors names and their torch, numpy and ONNX twins.

Each format spells the same types its own way (safetensors `BF16`, torch `bfloat16`, ONNX
TensorProto code 16, GGUF `BF16`); every mapping below is derived from the rows of `TABLE`,
so adding a type is one line. GGUF's float and integer type names equal the safetensors names
(F32, F16, BF16, F64, I8..I64); its quantized types live in gguf-py's GGMLQuantizationType.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # safetensors (and GGUF, for the types both have)
    itemsize: int
    torch: str  # torch attribute
    numpy: str | None  # numpy dtype name; None where numpy has none (bf16, fp8)
    onnx: int  # onnx.TensorProto.DataType
    is_float: bool


# an HF (safetensors) output's --dtype -> the safetensors type; auto: keep the source's float type
HF_OUT_DTYPES: dict[str, str | None] = {"auto": None, "bf16": "BF16", "f16": "F16", "f32": "F32"}
# an ONNX export's --dtype spellings -> the torch type it computes in (auto: float32; int8/int4: weights
# packed for MatMulNBits/QMoE, activations float32)
ONNX_DTYPES: dict[str, str] = {"auto": "float32", "fp32": "float32", "f32": "float32", "float32": "float32",
                               "fp16": "float16", "f16": "float16", "float16": "float16", "bf16": "bfloat16",
                               "bfloat16": "bfloat16", "int8": "float32", "int4": "float32"}
# the torch types the layer-streamed forward pass (experts stats/compare/prune) computes in
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

TABLE: tuple[DType, ...] = (
    DType("F64", 8, "float64", "float64", 11, True),
    DType("F32", 4, "float32", "float32", 1, True),
    DType("F16", 2, "float16", "float16", 10, True),
    DType("BF16", 2, "bfloat16", None, 16, True),
    DType("F8_E4M3", 1, "float8_e4m3fn", None, 17, True),
    DType("F8_E5M2", 1, "float8_e5m2", None, 19, True),
    DType("I64", 8, "int64", "int64", 7, False),
    DType("I32", 4, "int32", "int32", 6, False),
    DType("I16", 2, "int16", "int16", 5, False),
    DType("I8", 1, "int8", "int8", 3, False),
    DType("U8", 1, "uint8", "uint8", 2, False),
    DType("BOOL", 1, "bool", "bool", 9, False),
)
BY_NAME = {d.name: d for d in TABLE}
ITEMSIZE = {d.name: d.itemsize for d in TABLE}
TORCH_NAME = {d.name: d.torch for d in TABLE}  # "BF16" -> "bfloat16"
FROM_TORCH = {d.torch: d.name for d in TABLE}  # "bfloat16" -> "BF16"
NUMPY_NAME = {d.name: d.numpy for d in TABLE if d.numpy}  # "F32" -> "float32"
FLOAT_NAMES = frozenset(d.name for d in TABLE if d.is_float)
FROM_ONNX = {d.onnx: d.name for d in TABLE}  # 16 -> "BF16"
# bytes per element of every fixed-size ONNX type (also those safetensors has no name for:
# UINT16, UINT32, UINT64, FLOAT8E4M3FNUZ, FLOAT8E5M2FNUZ)
ONNX_ITEMSIZE = {**{d.onnx: d.itemsize for d in TABLE}, 4: 2, 12: 4, 13: 8, 18: 1, 20: 1}
