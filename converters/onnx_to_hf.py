"""A corral ONNX export -> HF safetensors checkpoint (Llama4ForCausalLM), bit-exact.

The export keeps PyTorch parameter names as initializer names and records the name map in
metadata_props, so going back is a byte copy from `model.onnx.data` into safetensors shards,
in 64 MiB pieces (bounded memory). ONNX models without corral's map are refused: their
initializers may have been renamed, fused or transposed by an optimizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.onnx_export import KEY_TENSOR_MAP, MODEL_FILE, copy_tokenizer_files
from toolbox.errors import BadInputError, CorruptFileError, UnsupportedModelError
from toolbox.progress import NULL_PROGRESS, Progress

PIECE = 64 * 1024**2
_ST_DTYPES = {1: "F32", 10: "F16", 16: "BF16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass
class OnnxTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype
    file: Path
    offset: int
    length: int


@dataclass
class OnnxToHFResult:
    path: Path
    tensors: int
    dtype: str


def model_path(src: str | Path) -> Path:
    p = Path(src)
    path = p / MODEL_FILE if p.is_dir() else p
    if not path.is_file():
        raise BadInputError(f"{path}: no such ONNX model", hint="give a directory written by `corral convert "
                            "--to onnx` or its model.onnx", path=path)
    return path


def read_tensors(path: Path) -> tuple[Any, list[OnnxTensor]]:
    """The ModelProto (no weights) and where each mapped initializer's bytes are; refuses foreign models."""
    from license.artifact import load_onnx
    from toolbox.tensors.atomic import safe_join

    proto = load_onnx(path)
    props = {p.key: p.value for p in proto.metadata_props}
    if KEY_TENSOR_MAP not in props:
        raise UnsupportedModelError(f"{path}: not an ONNX model written by corral (no {KEY_TENSOR_MAP} in "
                                    "metadata_props)", hint="only `corral convert --to onnx` exports can go back "
                                    "to HF: optimizers rename, fuse and transpose weights", path=path)
    try:
        mapping = json.loads(props[KEY_TENSOR_MAP])
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: {KEY_TENSOR_MAP} is not valid JSON", path=path) from exc
    inits = {t.name: t for t in proto.graph.initializer}
    out: list[OnnxTensor] = []
    for name in mapping:
        t = inits.get(name)
        if t is None:
            raise CorruptFileError(f"{path}: initializer {name} named in {KEY_TENSOR_MAP} is missing", path=path)
        dtype = _ST_DTYPES.get(t.data_type)
        if dtype is None:
            raise UnsupportedModelError(f"{path}: initializer {name} has ONNX type {t.data_type}, not a float type "
                                        "corral writes", path=path)
        ext = {e.key: e.value for e in t.external_data}
        if "location" not in ext:
            raise CorruptFileError(f"{path}: initializer {name} is not in external data", path=path)
        try:
            data = safe_join(path.parent, ext["location"])
        except Exception as exc:
            raise BadInputError(f"{path}: external-data location {ext['location']!r} escapes the model directory",
                                path=path) from exc
        shape = tuple(int(d) for d in t.dims)
        length = int(ext.get("length", 0)) or _ITEMSIZE[dtype] * int(_prod(shape))
        out.append(OnnxTensor(name, shape, dtype, data, int(ext.get("offset", 0)), length))
    for f in {t.file for t in out}:
        if not f.is_file():
            raise BadInputError(f"{f}: external-data file is missing", hint=f"copy {f.name} next to {path.name}",
                                path=f)
        size = f.stat().st_size
        short = [t.name for t in out if t.file == f and t.offset + t.length > size]
        if short:
            raise CorruptFileError(f"{f}: truncated ({size} bytes; {short[0]} needs more)", path=f)
    return proto, out


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def convert_onnx_to_hf(src: str | Path, out: str | Path, *, name: str | None = None,
                       mau_declaration: str | None = None, fix_name: bool = False, force: bool = False,
                       progress: Progress = NULL_PROGRESS) -> OnnxToHFResult:
    """Recover the HF checkpoint (safetensors, config, tokenizer) from a corral ONNX export, stamped."""
    from license import keys as K
    from license.stamp import Stamp, write_sidecars
    from toolbox.checkpoint import from_config, read_config
    from toolbox.tensors.atomic import atomic_directory, check_output_path
    from toolbox.tensors.sink import SafetensorsWriter

    path = model_path(src)
    check_output_path(Path(out), force=force)
    proto, tensors = read_tensors(path)
    config = read_config(path.parent)
    ckpt = from_config(config, path.parent)  # refuses a config that is not Llama 4
    expected = ckpt.expected_tensors()
    have = {t.name: t.shape for t in tensors}
    if have != expected:
        diff = sorted(set(have) ^ set(expected)) or [n for n in have if have[n] != expected.get(n)]
        raise CorruptFileError(f"{path}: initializers do not match config.json (first difference: {diff[0]})",
                               path=path)
    props = {p.key: p.value for p in proto.metadata_props}
    default = props.get(K.MODEL_NAME) or f"Llama-4-{path.parent.name}"
    stamp = Stamp.create(name or default, declaration=mau_declaration, fix=fix_name, multimodal=False,
                         provenance={"operations": [{"op": "convert", "to": "hf", "from": "onnx"}],
                                     "source": path.parent.name})
    dtypes = {t.dtype for t in tensors}
    config["dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[next(iter(dtypes))] \
        if len(dtypes) == 1 else config.get("dtype", "float32")
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
        for t in tensors:
            writer.add(t.name, t.shape, t.dtype)
        writer.begin()
        with progress.task("copying weights (bytes)", total=sum(t.length for t in tensors)) as task:
            handles: dict[Path, Any] = {}
            try:
                for t in tensors:
                    fh = handles.get(t.file) or handles.setdefault(t.file, open(t.file, "rb"))  # noqa: SIM115
                    fh.seek(t.offset)
                    left = t.length
                    while left:
                        piece = fh.read(min(PIECE, left))
                        if not piece:
                            raise CorruptFileError(f"{t.file}: ends inside {t.name}", path=t.file)
                        writer.write_bytes(t.name, piece)
                        left -= len(piece)
                        task.advance(len(piece))
            finally:
                for fh in handles.values():
                    fh.close()
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(path.parent, staging)
        write_sidecars(staging, stamp)
    return OnnxToHFResult(Path(out), len(tensors), "+".join(sorted(dtypes)))


def data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model refers to (for inspect/verify)."""
    _, tensors = read_tensors(path)
    return sorted({t.file for t in tensors}, key=os.fspath)
