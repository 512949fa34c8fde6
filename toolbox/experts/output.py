"""What prune and extract share: the stamped, streamed HF output around a per-tensor rewrite."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.source import TensorInfo, TensorSource, raw_file_source

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "preprocessor_config.json",
                "processor_config.json")

# planned output tensor: (name, shape, safetensors dtype, writer callback that writes its bytes)
Planned = tuple[str, tuple[int, ...], str, Callable[[Any], None]]


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the text model's fields (text_config for the multimodal model)."""
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def default_name(src: str | Path, suffix: str) -> str:
    text = str(src)
    stem = f"4-{text[5:].capitalize()}-demo" if text.startswith("demo:") else (Path(text).name or "4")
    stem = stem if stem.lower().startswith("llama") else f"Llama-{stem}"
    return f"{stem}-{suffix}"


def make_stamp(src: str | Path, src_dir: Path, ckpt: Any, op: dict[str, Any], *, name: str | None, suffix: str,
               mau_declaration: str | None, fix_name: bool, base_model: str | None) -> Any:
    """The license stamp of a pruned / extracted model.

    No base_model_relation: the Hub's four relations (adapter, merge, quantized, finetune) each
    claim something an expert surgery is not; the operation itself, its criterion and the kept
    experts are recorded in the provenance instead, and base_model names the source when known."""
    from license.stamp import Stamp

    try:
        from toolbox.hub.manifest import source_origin

        origin = source_origin(src_dir)
    except ImportError:
        origin = {}
    return Stamp.create(name or default_name(src, suffix), declaration=mau_declaration, fix=fix_name,
                        base_model=base_model or origin.get("base_model"),
                        base_revision=None if base_model else origin.get("base_revision"),
                        multimodal=ckpt.multimodal,
                        provenance={"operations": [op], "sources": dict(origin.get("sources", {})),
                                    "source": str(src) if str(src).startswith("demo:") else Path(src).name})


def write_checkpoint(out: Path, src_dir: Path, plan: list[Planned], config: dict[str, Any], stamp: Any, *,
                     force: bool, label: str, progress: Progress = NULL_PROGRESS) -> int:
    """Write planned tensors through one SafetensorsWriter into an atomic directory; returns bytes written."""
    from license.stamp import write_sidecars
    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.sink import SafetensorsWriter

    total = sum(TensorInfo(n, s, d).nbytes for n, s, d, _ in plan)
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
        for n, s, d, _ in plan:
            writer.add(n, s, d)
        writer.begin()
        with progress.task(f"{label} (bytes)", total=total) as task:
            for n, s, d, emit in plan:
                emit(writer)
                task.advance(TensorInfo(n, s, d).nbytes)
        writer.finish()
        cfg = json.loads(json.dumps(config))
        cfg.pop("quantization_config", None)  # FP8 sources are dequantized on read
        (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for filename in COPIED_FILES:
            if (src_dir / filename).is_file():
                shutil.copyfile(src_dir / filename, staging / filename)
        write_sidecars(staging, stamp)
    return total


def copy_tensor(source: TensorSource, info: TensorInfo) -> Callable[[Any], None]:
    """A writer callback copying one tensor as it is: in the kernel when the bytes are stored as they will be
    written, else one expert slice at a time through memory."""
    def emit(writer: Any) -> None:
        raw = raw_file_source(source, info.name)
        if raw is not None and hasattr(writer, "copy_range"):
            writer.copy_range(info.name, *raw.byte_range(info.name))
        elif len(info.shape) == 3 and info.name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            for e in range(info.shape[0]):
                writer.write(info.name, source.load_slice(info.name, e))
        else:
            writer.write(info.name, source.load(info.name))
    return emit
