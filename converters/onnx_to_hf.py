"""A corral ONNX export -> HF safetensors checkpoint (Llama4ForCausalLM), bit-exact.

The export keeps PyTorch parameter names as initializer names and records the name map in
metadata_props, so going back is a byte copy from `model.onnx.data` into safetensors shards,
in 64 MiB pieces (bounded memory). ONNX models without corral's map are refused: their
initializers may have been renamed, fused or transposed by an optimizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.onnx_export import KEY_TENSOR_MAP, MODEL_FILE, copy_tokenizer_files
from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, CorruptFileError, UnsupportedModelError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.dtypes import FROM_ONNX, TORCH_NAME

PIECE = 64 * 1024**2
_ST_DTYPES = {code: name for code, name in FROM_ONNX.items() if name in ("F32", "F16", "BF16")}  # corral writes


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
    from toolbox.tensors.jsonio import loads_json
    from toolbox.tensors.onnx_external import check_files, external_data

    proto = load_onnx(path)
    props = {p.key: p.value for p in proto.metadata_props}
    if KEY_TENSOR_MAP not in props:
        raise UnsupportedModelError(f"{path}: not an ONNX model written by corral (no {KEY_TENSOR_MAP} in "
                                    "metadata_props)", hint="only `corral convert --to onnx` exports can go back "
                                    "to HF: optimizers rename, fuse and transpose weights", path=path)
    if "corral.onnx.quant" in props:  # converters.onnx_export.KEY_QUANT
        raise UnsupportedModelError(f"{path}: an int4/int8 export; its weights cannot go back to HF unchanged",
                                    hint="convert the original checkpoint, or export fp32/fp16/bf16 for a "
                                    "round trip", path=path)
    mapping = loads_json(props[KEY_TENSOR_MAP], what=f"{path}: metadata_props {KEY_TENSOR_MAP}",
                         max_bytes=64 * 1024**2, expect=dict, path=path)
    inits = {t.name: t for t in proto.graph.initializer}
    out: list[OnnxTensor] = []
    refs = []
    for name in mapping:
        t = inits.get(name)
        if t is None:
            raise CorruptFileError(f"{path}: initializer {name} named in {KEY_TENSOR_MAP} is missing", path=path)
        dtype = _ST_DTYPES.get(t.data_type)
        if dtype is None:
            raise UnsupportedModelError(f"{path}: initializer {name} has ONNX type {t.data_type}, not a float type "
                                        "corral writes", path=path)
        ref = external_data(path, t)  # location inside the directory, offset/length checked against dims
        if ref is None or ref.length is None:
            raise CorruptFileError(f"{path}: initializer {name} is not in external data", path=path)
        shape = tuple(int(d) for d in t.dims)
        out.append(OnnxTensor(name, shape, dtype, ref.file, ref.offset, ref.length))
        refs.append(ref)
    check_files(path, refs)
    return proto, out


def hf_config(path: Path, tensors: list[OnnxTensor]) -> dict[str, Any]:
    """The export's config.json as the HF checkpoint's (dtype: the initializers' one float type), checked
    against the initializers (CorruptFileError naming the first difference)."""
    from toolbox.checkpoint import from_config, read_config

    config = read_config(path.parent)
    ckpt = from_config(config, path.parent)  # refuses a config that is not Llama 4
    expected = ckpt.expected_tensors()
    have = {t.name: t.shape for t in tensors}
    if have != expected:
        diff = sorted(set(have) ^ set(expected)) or [n for n in have if have[n] != expected.get(n)]
        raise CorruptFileError(f"{path}: initializers do not match config.json (first difference: {diff[0]})",
                               path=path)
    dtypes = {t.dtype for t in tensors}
    config["dtype"] = TORCH_NAME[next(iter(dtypes))] if len(dtypes) == 1 else config.get("dtype", "float32")
    return config


def hf_stamp(path: Path, proto: Any, opts: LicenseOptions) -> Any:
    """The stamp of the HF model read from the export: the graph's carried stamp and name, then this conversion."""
    from license import keys as K
    from license.stamp import StampInput, derive_stamp

    props = {p.key: p.value for p in proto.metadata_props}
    carried = {k: v for k, v in props.items() if K.is_stamp_key(k)}
    return derive_stamp(StampInput(path.parent.name, prior=carried, carried_name=props.get(K.MODEL_NAME)),
                        {"op": "convert", "to": "hf", "from": "onnx"}, opts)


def convert_onnx_to_hf(src: str | Path, out: str | Path, *, force: bool = False,
                       license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                       **legacy: Any) -> OnnxToHFResult:
    """Recover the HF checkpoint (safetensors, config, tokenizer) from a corral ONNX export, stamped."""
    from license.stamp import write_sidecars
    from toolbox.tensors.atomic import atomic_directory, check_output_path
    from toolbox.tensors.sink import SafetensorsWriter

    opts = LicenseOptions.of(license_options, **legacy)
    path = model_path(src)
    check_output_path(Path(out), force=force)
    proto, tensors = read_tensors(path)
    config = hf_config(path, tensors)
    stamp = hf_stamp(path, proto, opts)
    dtypes = {t.dtype for t in tensors}
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
        for t in tensors:
            writer.add(t.name, t.shape, t.dtype)
        writer.begin()
        with progress.task("copying weights", total=sum(t.length for t in tensors), unit="bytes") as task:
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
