"""Any HF-family source -> a plain HF checkpoint in the fused layout transformers loads, streamed.

The everyday "make it fine-tunable" conversion: per-expert expert tensors are fused, FP8 weights
dequantized (their scales dropped, `quantization_config` removed), Meta's original format mapped to
HF names; everything goes through the canonical view (`toolbox.tensors.canonical`) one tensor, or one
expert slice of a fused tensor, at a time, and is written as bf16 (`--dtype auto`, or f32 when every
float tensor of the source is f32), bf16, f16 or f32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions
from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorInfo, TensorSource

OUT_DTYPES = {"auto": None, "bf16": "BF16", "f32": "F32", "f16": "F16"}
_FLOATS = frozenset({"BF16", "F16", "F32", "F64"})
_FUSED = ("experts.gate_up_proj", "experts.down_proj")
ROW_BLOCK_BYTES = 64 * 2**20  # a large tensor (a 202,048-row embedding is 2 GB) is written in row blocks of this size


@dataclass
class HFResult:
    path: Path
    tensors: int
    dtype: str


def output_dtype(source: TensorSource, dtype: str) -> str:
    """The safetensors dtype every float tensor is written in (integer tensors keep theirs)."""
    if dtype not in OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, f16 or f32")
    chosen = OUT_DTYPES[dtype]
    if chosen is not None:
        return chosen
    kinds = {i.dtype for i in source.infos().values() if i.dtype in _FLOATS}
    return "F32" if kinds == {"F32"} else "BF16"


def output_config(config: dict[str, Any], st_dtype: str) -> dict[str, Any]:
    """The input's config as the output's: no quantization config (weights are dequantized), the new dtype."""
    from toolbox.tensors.dtypes import TORCH_NAME

    cfg: dict[str, Any] = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)
    cfg["dtype"] = TORCH_NAME[st_dtype]
    cfg.pop("torch_dtype", None)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].pop("quantization_config", None)
        cfg["text_config"]["dtype"] = TORCH_NAME[st_dtype]
        cfg["text_config"].pop("torch_dtype", None)
        if isinstance(cfg.get("vision_config"), dict):
            cfg["vision_config"]["dtype"] = TORCH_NAME[st_dtype]
            cfg["vision_config"].pop("torch_dtype", None)
    return cfg


def convert_hf_to_hf(model: ResolvedModel, out: str | Path, *, dtype: str = "auto", force: bool = False,
                     license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS
                     ) -> HFResult:
    """Write `model` as a plain fused-layout HF checkpoint in `out` (atomic), license-stamped.

    The stamp follows the input (its relation and history) with a `convert` operation added."""
    from license.stamp import derive_stamp
    from toolbox.tensors.atomic import atomic_directory, check_output_path, ensure_free_space
    from toolbox.tensors.sink import SafetensorsWriter
    from toolbox.tensors.source import TensorInfo

    out = Path(out)
    if out.absolute().resolve() in (model.directory.absolute().resolve(), model.path.absolute().resolve()):
        raise UsageError(f"{out}: the output would replace its own source", hint="write to another directory")
    ckpt = model.checkpoint
    source = model.open_source(canonical=True)
    try:
        st_dtype = output_dtype(source, dtype)
        check_output_path(out.absolute(), force=force)
        plan = [(i.name, i.shape, st_dtype if i.dtype in _FLOATS or _dequantized(source, i) else i.dtype)
                for i in source.infos().values()]
        total = sum(TensorInfo(n, s, d).nbytes for n, s, d in plan)
        ensure_free_space(out, total, f"converting into {out.name}")
        stamp = derive_stamp(model.stamp_input(source), {"op": "convert", "to": "hf", "dtype": st_dtype},
                             license_options, multimodal=ckpt.multimodal)
        with atomic_directory(out, force=force) as staging:
            writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
            for n, s, d in plan:
                writer.add(n, s, d)
            writer.begin()
            with progress.task("converting", total=total, unit="bytes") as task:
                for n, s, d in plan:
                    _write_tensor(writer, source, source.infos()[n], d)
                    task.advance(TensorInfo(n, s, d).nbytes)
            writer.finish()
            _finish(staging, model, output_config(ckpt.config, st_dtype), stamp)
    finally:
        source.close()
    return HFResult(out, len(plan), st_dtype)


def _dequantized(source: TensorSource, info: TensorInfo) -> bool:
    return info.dtype not in _FLOATS and info.dtype.startswith("F8")


def _write_tensor(writer: Any, source: TensorSource, info: TensorInfo, st_dtype: str) -> None:
    """One tensor: fused experts one expert slice at a time, anything else whole; floats cast (overflow refused)."""
    import torch

    from toolbox.tensors.dtypes import TORCH_NAME
    from toolbox.tensors.finite import cast_checked

    target = getattr(torch, TORCH_NAME[st_dtype])
    file = str(source.path)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return (cast_checked(t, target, info.name, file) if t.is_floating_point() else t).contiguous()

    if len(info.shape) == 3 and info.name.endswith(_FUSED):
        for e in range(info.shape[0]):
            writer.write(info.name, cast(source.load_slice(info.name, e)))
    elif getattr(source, "row_slices", False) and len(info.shape) >= 2 and info.nbytes > ROW_BLOCK_BYTES:
        step = max(1, ROW_BLOCK_BYTES * info.shape[0] // info.nbytes)  # a source that reads only the rows asked
        for start in range(0, info.shape[0], step):
            writer.write(info.name, cast(source.load_slice(info.name, slice(start, start + step))))
    else:
        writer.write(info.name, cast(source.load(info.name)))


def _finish(staging: Path, model: ResolvedModel, config: dict[str, Any], stamp: Any) -> None:
    """config.json, the tokenizer files (from the input; for Meta's format, which has none, from the directory
    `toolbox.reference` derived its config into) and the license sidecars."""
    from toolbox.hf_output import finish_hf_directory

    src_dir = model.checkpoint.path if model.meta_dir is not None and model.checkpoint.path else model.directory
    finish_hf_directory(staging, src_dir, config, stamp)
