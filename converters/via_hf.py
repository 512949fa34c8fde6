"""GGUF -> ONNX and ONNX -> GGUF, through a staged HF checkpoint.

Each of the two formats is read tensor by tensor into transformers' names by its own HF converter
(`gguf_to_hf`, `onnx_to_hf`), and written by the other side's (`onnx_export`, `hf_to_gguf`). The HF
checkpoint in between is staged as a hidden partial beside the output (`.NAME.corral-partial-*`, the
same file system, removed when the conversion ends, on error too), so the disk cost is one full-precision
copy of the model on top of the output (`stage_bytes` says how much, before any work). Memory stays
that of the two converters: one tensor or one expert slice. The staged copy is f32 when the target is
f32 (a GGUF's F16/BF16/quantized tensors dequantize exactly into f32), so nothing is rounded twice.

Provenance: the output's stamp carries the input's history plus both steps (`convert` to hf, then to
the target), as if the user had run the two conversions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.atomic import check_output_path, ensure_free_space, new_partial, release_partial

STAGE_FACTOR = 4  # bytes per parameter of the f32 staged copy


def stage_bytes(parameters: int) -> int:
    """Disk the staged HF copy of a model with `parameters` weights needs."""
    return parameters * STAGE_FACTOR


def _staged(output: Path, need: int) -> Path:
    ensure_free_space(output.absolute().parent, need, "the staged HF checkpoint between the two formats")
    return new_partial(output, directory=True, tag="hf")


def convert_gguf_to_onnx(src: str | Path, out: str | Path, *, dtype: str = "fp32", force: bool = False,
                         license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                         **onnx_options: Any) -> Any:
    """A GGUF file (corral's, llama.cpp's or any Llama 4 GGUF corral reads) as an ONNX export."""
    from converters.gguf_to_hf import convert_gguf_to_hf
    from converters.onnx_export import convert_hf_to_onnx
    from toolbox.reference import resolve
    from toolbox.tensors.gguf.reader import GGUFFile

    output = Path(out)
    check_output_path(output, force=force)
    params = sum(t.n_elements for t in GGUFFile(src).tensors.values())
    stage = _staged(output, stage_bytes(params))
    try:
        hf = stage / "hf"
        staged_dtype = "f32" if dtype in ("fp32", "auto") else "auto"
        convert_gguf_to_hf(src, hf, dtype=staged_dtype, license_options=license_options, progress=progress)
        return convert_hf_to_onnx(resolve(hf), output, dtype=dtype, force=force, license_options=license_options,
                                  progress=progress, **onnx_options)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        release_partial(stage)


def convert_onnx_to_gguf(src: str | Path, out: str | Path, *, force: bool = False,
                         license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                         **gguf_options: Any) -> Any:
    """A corral ONNX export as a GGUF file (any --outtype the HF -> GGUF conversion writes)."""
    from converters.hf_to_gguf import convert_hf_to_gguf
    from converters.onnx_to_hf import convert_onnx_to_hf, model_path
    from toolbox.reference import resolve

    output = Path(out)
    check_output_path(output, force=force)
    model = model_path(src)
    weights = sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file())
    stage = _staged(output, weights)
    try:
        hf = stage / "hf"
        convert_onnx_to_hf(src, hf, license_options=license_options, progress=progress)
        return convert_hf_to_gguf(resolve(hf), output, force=force, license_options=license_options,
                                  progress=progress, **gguf_options)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        release_partial(stage)
