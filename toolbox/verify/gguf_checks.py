"""inspect and verify for GGUF files (and split sets) that claim to be Llama 4."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError

F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", "rope_freqs.weight")


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    from converters.gguf_to_hf import hf_config_for
    from toolbox.checkpoint import from_config
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(path)
    info: dict[str, Any] = {
        "path": str(g.path), "format": "gguf", "architecture": g.architecture, "name": g.get("general.name"),
        "files": [str(p) for p in g.parts], "bytes": sum(p.stat().st_size for p in g.parts),
        "tensors": len(g.tensors), "types": dict(Counter(g.type_name(n) for n in g.tensors)),
        "file_type": g.get("general.file_type"),
        "license": {k: g.get(k) for k in ("general.license", "general.license.name", "general.license.link")},
        "corral_provenance": g.get("corral.hf_config") is not None,
    }
    if g.architecture == "llama4":
        ckpt = from_config(hf_config_for(g))
        counts = ckpt.parameter_counts()
        info.update({
            "variant": ckpt.variant, "shaped_like": ckpt.family,
            "parameters": {"text": counts["text"], "active_text": counts["active_text"]},
            **ckpt.summary(),
        })
    elif g.architecture == "clip":  # an mmproj (vision tower + projector for llama.cpp's multimodal runtime)
        from converters.gguf_mmproj_to_hf import mmproj_summary

        info["mmproj"] = mmproj_summary(g.path)
    tokens = g.get("tokenizer.ggml.tokens") or []
    info["tokenizer"] = {"model": g.get("tokenizer.ggml.model"), "pre": g.get("tokenizer.ggml.pre"),
                         "vocab_size": len(tokens), "bos_id": g.get("tokenizer.ggml.bos_token_id"),
                         "eos_id": g.get("tokenizer.ggml.eos_token_id"),
                         "chat_template": bool(g.get("tokenizer.chat_template"))}
    return info


def verify_gguf(path: str | Path, report: Any) -> None:
    """Tensor inventory against the file's own metadata, tensor types, tokenizer sanity."""
    from converters.gguf_to_hf import hf_config_for
    from converters.hf_to_gguf import expected_gguf_shapes
    from toolbox.checkpoint import from_config
    from toolbox.tensors.gguf.reader import GGUFFile

    try:
        g = GGUFFile(path)
    except CorralError as exc:
        report.add("gguf.corrupt", "fatal", exc.message, path=exc.path)
        return
    if g.architecture == "clip":
        from converters.gguf_mmproj_to_hf import verify_mmproj

        verify_mmproj(g.path, report)
        return
    if g.architecture != "llama4":
        report.add("gguf.architecture", "fatal", f"{g.path}: architecture {g.architecture!r} is not llama4",
                   path=str(g.path))
        return
    try:
        ckpt = from_config(hf_config_for(g))
    except CorralError as exc:
        report.add("gguf.metadata", "fatal", exc.message, path=str(g.path))
        return
    expected = expected_gguf_shapes(ckpt)
    for name in expected.keys() - g.tensors.keys():
        if name == "output.weight" and ckpt.text.tie_embeddings:
            continue
        report.add("tensor.missing", "error", f"missing tensor {name} {list(expected[name])}", tensor=name)
    for name in g.tensors.keys() - expected.keys():
        report.add("tensor.unexpected", "error", f"unexpected tensor {name}", tensor=name)
    for name in expected.keys() & g.tensors.keys():
        if g.shape(name) != expected[name]:
            report.add("tensor.shape", "error", f"{name} has shape {list(g.shape(name))}, the metadata implies "
                       f"{list(expected[name])}", tensor=name)
        if name.endswith(F32_SUFFIXES) and g.type_name(name) != "F32":
            report.add("tensor.dtype", "warning", f"{name} is {g.type_name(name)}; norms and the router should be F32",
                       tensor=name)
    tokens = g.get("tokenizer.ggml.tokens") or []
    types = g.get("tokenizer.ggml.token_type") or []
    if len(tokens) != ckpt.text.vocab or len(types) != len(tokens):
        report.add("tokenizer.vocab", "error", f"{len(tokens)} tokens / {len(types)} types for a "
                   f"{ckpt.text.vocab}-row embedding", path=str(g.path))
    for key in ("bos", "eos", "padding"):
        tid = g.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and not 0 <= int(tid) < len(tokens):
            report.add("tokenizer.special-id", "error", f"{key} id {tid} is outside the vocabulary", path=str(g.path))
        elif tid is not None and types and types[int(tid)] != 3:
            report.add("tokenizer.special-id", "warning", f"{key} token {tokens[int(tid)]!r} is not a control token",
                       path=str(g.path))
    if g.get("tokenizer.ggml.pre") != "llama4":
        report.add("tokenizer.pre", "error", f"pre-tokenizer {g.get('tokenizer.ggml.pre')!r} is not llama4: "
                   "llama.cpp would split text differently", path=str(g.path))
    report.checked.update({"format": "gguf", "tensors": len(g.tensors), "shards": len(g.parts)})
