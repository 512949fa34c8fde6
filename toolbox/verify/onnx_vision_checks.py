"""verify for the image graphs of an ONNX export (`convert --to onnx --vision`): vision.onnx, embedding.onnx,
decoder_embeds.onnx and preprocessor_config.json. Graphs only are read; weights stay on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError

# file -> (input names, output names) it must have; the decoder's cache inputs are checked by prefix
GRAPHS = {"vision.onnx": (["pixel_values"], ["image_features"]),
          "embedding.onnx": (["input_ids", "image_features"], ["inputs_embeds"]),
          "decoder_embeds.onnx": (["inputs_embeds", "attention_mask", "position_ids"], ["logits"])}


def verify_vision(root: Path, report: Any) -> None:
    """Nothing to check without vision.onnx; with it, every image graph, its data, stamp and the processor file."""
    if not (root / "vision.onnx").is_file():
        return
    for name, (ins, outs) in GRAPHS.items():
        _check_graph(root / name, ins, outs, report)
    cfg = root / "preprocessor_config.json"
    try:
        settings = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        settings = {}
    if not isinstance(settings, dict) or not isinstance(settings.get("corral_vision"), dict):
        report.add("vision.processor", "error", "preprocessor_config.json missing or without the image layout "
                   "(size, tokens per tile, image token id) that feeds vision.onnx", path=str(cfg))
    report.checked["vision"] = True


def _check_graph(file: Path, ins: list[str], outs: list[str], report: Any) -> None:
    import onnx

    from license.artifact import load_onnx
    from toolbox.tensors.onnx_external import external_refs

    if not file.is_file():
        report.add("vision.missing", "error", f"{file.name} missing beside vision.onnx", path=str(file))
        return
    try:
        model = load_onnx(file)
        refs = external_refs(file, model)
    except CorralError as exc:
        report.add("onnx.corrupt", "fatal", exc.message, path=str(file))
        return
    for ref in refs:
        if not ref.file.is_file() or ref.offset + (ref.length or 0) > ref.file.stat().st_size:
            report.add("onnx.truncated", "fatal", f"{file.name}: {ref.location} missing or ends before {ref.tensor}",
                       path=str(file), tensor=ref.tensor)
            return
    try:
        onnx.checker.check_model(str(file))
    except Exception as exc:  # onnx.checker.ValidationError and I/O errors
        report.add("onnx.checker", "error", f"{file.name}: onnx.checker: {str(exc).splitlines()[0][:300]}",
                   path=str(file))
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if got_in[:len(ins)] != ins or got_out[:len(outs)] != outs:
        report.add("onnx.signature", "error", f"{file.name}: I/O {got_in[:3]} -> {got_out[:2]}, expected {ins} -> "
                   f"{outs}", path=str(file))
    if "corral.license.policy" not in {p.key for p in model.metadata_props}:
        report.add("license.unstamped", "warning", f"{file.name}: no license stamp in metadata_props",
                   path=str(file))
