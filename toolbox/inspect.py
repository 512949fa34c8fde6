"""A summary of a checkpoint from headers, config and tokenizer files (no weights read)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from toolbox.checkpoint import load_checkpoint
from toolbox.errors import CorralError
from toolbox.progress import NULL_PROGRESS, Progress

LICENSE_FILES = ("LICENSE", "NOTICE", "USE_POLICY.md", "README.md")


def inspect_checkpoint(path: str | Path, *, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Describe an HF Llama 4 checkpoint as a JSON-ready dict. Raises CorralError on bad input."""
    from toolbox.reference import resolve_path
    from toolbox.tensors.canonical import hf_view
    from toolbox.tensors.safetensors_source import SafetensorsSource
    from toolbox.tokenizer_files import load_tokenizer_files

    if str(path).endswith(".gguf"):
        from toolbox.verify.gguf_checks import inspect_gguf

        return inspect_gguf(path)
    from toolbox.verify.onnx_checks import inspect_onnx, is_onnx

    if is_onnx(path):
        return inspect_onnx(path)
    root = resolve_path(path, progress=progress)
    from toolbox.reference import ModelReference, ResolvedModel

    model = ResolvedModel(ModelReference.parse(root), root)
    if model.meta_dir is not None:  # Meta's original format: params.json + consolidated.NN.pth
        from toolbox.verify.meta_checks import inspect_meta

        return inspect_meta(model)
    ckpt = load_checkpoint(root)
    raw = SafetensorsSource(root)
    view = hf_view(raw, ckpt.config)
    counts = ckpt.parameter_counts()
    stored = sum(info.numel for info in view.infos().values())
    directory = root if root.is_dir() else root.parent
    info: dict[str, Any] = {
        "path": str(root),
        "format": "hf-safetensors",
        "architecture": ckpt.architecture,
        "variant": ckpt.variant,
        "shaped_like": ckpt.family,
        "multimodal": ckpt.multimodal,
        "parameters": {**counts, "stored": stored},
        **ckpt.summary(),
        "dtypes": dict(Counter(i.dtype for i in raw.infos().values())),
        "layout": "per-expert" if view.per_expert else "fused",
        "fp8": view.fp8,
        **_quantization(ckpt.config),
        "shards": {"count": len(raw.headers), "bytes": sum(h.file_size for h in raw.headers)},
        "license_files": {name: (directory / name).is_file() for name in LICENSE_FILES},
    }
    if ckpt.vision is not None:
        v = ckpt.vision
        info["vision"] = {"hidden_size": v.hidden, "layers": v.layers, "image_size": v.image_size,
                          "patch_size": v.patch_size}
    try:
        tok = load_tokenizer_files(directory)
        info["tokenizer"] = {
            "vocab_size": tok.vocab_size,
            "bos": tok.special_token("bos_token"),
            "eos": tok.special_token("eos_token"),
            "pad": tok.special_token("pad_token"),
            "chat_template": tok.chat_template is not None,
        }
    except CorralError as exc:
        info["tokenizer"] = {"error": exc.message}
    raw.close()
    return info


def _quantization(config: dict[str, Any]) -> dict[str, Any]:
    """The quantization config a checkpoint names, when its weights are stored quantized."""
    from toolbox.tensors.compressed import compressed_tensors_config, describe

    qc = compressed_tensors_config(config)
    return {"quantization": describe(qc)} if qc is not None else {}
