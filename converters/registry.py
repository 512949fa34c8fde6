"""Which converter handles which (source format, target format) pair."""

from __future__ import annotations

from pathlib import Path

from toolbox.errors import BadInputError, UsageError

FORMATS = ("hf", "gguf", "onnx")
PAIRS = {
    ("hf", "gguf"): "converters.hf_to_gguf:convert_hf_to_gguf",
    ("gguf", "hf"): "converters.gguf_to_hf:convert_gguf_to_hf",
    ("hf", "onnx"): "converters.onnx_export:convert_hf_to_onnx",
    ("onnx", "hf"): "converters.onnx_to_hf:convert_onnx_to_hf",
}


def detect_format(path: str | Path) -> str:
    """hf (a checkpoint directory, a .safetensors file, demo:*), gguf (.gguf file) or onnx."""
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
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory", path=p)
    raise BadInputError(f"{p}: not an HF checkpoint, GGUF file or ONNX model", path=p)


def converter_for(source_format: str, target: str) -> object:
    import importlib

    key = PAIRS.get((source_format, target))
    if key is None:
        supported = ", ".join(f"{a}->{b}" for a, b in PAIRS)
        raise UsageError(f"no converter from {source_format} to {target}", hint=f"supported: {supported}")
    module, func = key.split(":")
    return getattr(importlib.import_module(module), func)
