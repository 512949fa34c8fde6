"""GGUF -> ONNX and ONNX -> GGUF, streamed: each input is read through a view that presents it as an HF
checkpoint (converters/hf_views.py) and written by the other side's HF exporter (`onnx_export`,
`hf_to_gguf`), one tensor, expert or row block at a time. No HF copy of the weights is written: the disk
cost is the output, plus (GGUF -> ONNX) a hidden partial beside it holding the config.json and tokenizer
files rebuilt from the GGUF's keys, removed when the conversion ends, on error too.

A GGUF's F32/F16/Q* tensors are dequantized into float32 (BF16 stays BF16), so an fp32 export of a float
GGUF holds its weights unchanged and a quantized GGUF is rounded once, to the export dtype.

Provenance: the output's stamp carries the input's history, the step to HF that the view stands for
(`convert` to hf, lossy when dequantized) and the conversion to the target.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.atomic import check_output_path, new_partial, release_partial


def convert_gguf_to_onnx(src: str | Path, out: str | Path, *, dtype: str = "fp32", force: bool = False,
                         license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                         **onnx_options: Any) -> Any:
    """A GGUF file (corral's, llama.cpp's or any Llama 4 GGUF corral reads) as an ONNX export."""
    from converters.hf_views import gguf_model
    from converters.onnx_export import convert_hf_to_onnx

    output = Path(out)
    check_output_path(output, force=force)
    opts = LicenseOptions.of(license_options)
    side = new_partial(output.absolute(), directory=True, tag="config-")  # config.json + tokenizer files
    try:
        model = gguf_model(src, side, opts)
        return convert_hf_to_onnx(model, output, dtype=dtype, force=force, license_options=opts, progress=progress,
                                  **onnx_options)
    finally:
        shutil.rmtree(side, ignore_errors=True)
        release_partial(side)


def convert_onnx_to_gguf(src: str | Path, out: str | Path, *, force: bool = False,
                         license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                         **gguf_options: Any) -> Any:
    """A corral float ONNX export as a GGUF file (any --outtype the HF -> GGUF conversion writes)."""
    from converters.hf_to_gguf import convert_hf_to_gguf
    from converters.hf_views import onnx_model

    check_output_path(Path(out).absolute(), force=force)
    opts = LicenseOptions.of(license_options)
    return convert_hf_to_gguf(onnx_model(src, opts), out, force=force, license_options=opts, progress=progress,
                              **gguf_options)
