"""Which converter handles which (source format, target format) pair, and which request options it takes.

`toolbox.convert.convert` dispatches through `PAIRS` alone: a new pair is one entry here (its
function and the `ConvertRequest` fields it accepts) plus, when its result has a new shape, one
line in `toolbox.convert`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, UsageError


@dataclass(frozen=True)
class Converter:
    entry: str  # "module:function"; the function takes (source, output, *, force, license_options, progress, ...)
    options: tuple[str, ...]  # the converter keywords, prepared by toolbox.convert from the request

    def load(self) -> Callable[..., Any]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


PAIRS: dict[tuple[str, str], Converter] = {
    ("hf", "gguf"): Converter("converters.hf_to_gguf:convert_hf_to_gguf",
                              ("outtype", "split_max_size", "allow_lossy_config", "multimodal", "overrides",
                               "imatrix", "include_weights", "exclude_weights", "parts", "keep_float")),
    ("gguf", "hf"): Converter("converters.gguf_to_hf:convert_gguf_to_hf", ("dtype", "mmproj")),
    ("hf", "onnx"): Converter("converters.onnx_export:convert_hf_to_onnx",
                              ("dtype", "opset", "kv_cache", "vision", "block_size", "symmetric", "accuracy_level",
                               "keep_float")),
    ("onnx", "hf"): Converter("converters.onnx_to_hf:convert_onnx_to_hf", ()),
    ("hf", "hf"): Converter("converters.hf_to_hf:convert_hf_to_hf", ("dtype",)),
    # streamed through a view of the input as an HF checkpoint (converters/hf_views.py): no HF copy on disk
    ("gguf", "onnx"): Converter("converters.gguf_onnx:convert_gguf_to_onnx", ("dtype", "opset", "kv_cache")),
    ("onnx", "gguf"): Converter("converters.gguf_onnx:convert_onnx_to_gguf",
                                ("outtype", "split_max_size", "allow_lossy_config", "overrides", "imatrix",
                                 "include_weights", "exclude_weights", "keep_float")),
}


def detect_format(path: str | Path) -> str:
    """hf (a checkpoint directory, a .safetensors file, demo:*, Meta's params.json + consolidated.NN.pth),
    gguf (.gguf file) or onnx."""
    text = str(path)
    if text.startswith("demo:"):
        return "hf"
    p = Path(path)
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file()):
        return "onnx"
    if p.suffix == ".safetensors" or (p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.safetensors")))):
        return "hf"
    from toolbox.tensors.meta_source import meta_directory

    if meta_directory(p) is not None:
        return "hf"  # Meta's original format (or a download's original/ folder): read as an HF-family source
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory", path=p)
    raise BadInputError(f"{p}: not an HF checkpoint, Meta checkpoint, GGUF file or ONNX model", path=p)


def converter_for(source_format: str, target: str) -> Converter:
    """The converter of a pair; UsageError (exit 2) naming the supported pairs otherwise."""
    conv = PAIRS.get((source_format, target))
    if conv is None:
        supported = ", ".join(f"{a}->{b}" for a, b in PAIRS)
        raise UsageError(f"no converter from {source_format} to {target}", hint=f"supported: {supported}")
    return conv
