"""What prune and extract share: the stamped, streamed HF output around a per-tensor rewrite."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.source import TensorInfo, TensorSource, raw_file_source

if TYPE_CHECKING:
    from license.stamp import LicenseOptions, Stamp
    from toolbox.reference import ResolvedModel

# planned output tensor: (name, shape, safetensors dtype, writer callback that writes its bytes)
Planned = tuple[str, tuple[int, ...], str, Callable[[Any], None]]


def require_hf(spec: Any) -> None:
    """Refuse a GGUF or ONNX model up front (exit 3): the expert tools rewrite HF safetensors checkpoints,
    and without this check the user would get "config.json: not found" for a file they know has no such thing."""
    from toolbox.errors import BadInputError

    text = str(getattr(spec, "path", spec))
    if text.startswith("demo:"):
        return
    path = Path(text)
    kind = ("GGUF" if path.suffix.lower() == ".gguf" else "ONNX" if path.suffix.lower() == ".onnx" else
            "ONNX" if path.is_dir() and (path / "model.onnx").is_file() and not (path / "config.json").exists()
            else None)
    if kind is None and path.is_file():
        with open(path, "rb") as f:
            kind = "GGUF" if f.read(4) == b"GGUF" else None
    if kind is not None:
        raise BadInputError(f"{path}: a {kind} model; the experts commands read HF checkpoints only: "
                            "convert --to hf first", path=path,
                            hint=f"corral convert {path} --to hf -o DIR, then run this on DIR")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the text model's fields (text_config for the multimodal model)."""
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def make_stamp(model: ResolvedModel, source: TensorSource, op: dict[str, Any], *, suffix: str,
               options: LicenseOptions) -> Stamp:
    """The license stamp of a pruned / extracted model.

    No base_model_relation of its own: the Hub's four relations (adapter, merge, quantized, finetune)
    each claim something an expert surgery is not (an input's relation, a merge's, is kept); the
    operation itself, its criterion and the kept experts are recorded in the provenance, after the
    input's history, and base_model names the source when known."""
    from license.stamp import derive_stamp

    return derive_stamp(model.stamp_input(source), op, options, suffix=suffix,
                        multimodal=model.checkpoint.multimodal)


def write_checkpoint(out: Path, src_dir: Path, plan: list[Planned], config: dict[str, Any], stamp: Stamp, *,
                     force: bool, label: str, progress: Progress = NULL_PROGRESS,
                     shards: Collection[int] | None = None, max_shard_bytes: int | None = None) -> int:
    """Write planned tensors through one SafetensorsWriter into an atomic directory; returns bytes written.

    `shards` (0-based, of `plan_shard_count`) writes only those shard files, each byte for byte as the whole run
    writes it, and reads nothing of the other shards' tensors; `shards=()` writes the rest of the checkpoint
    (config, tokenizer, license files and the index), so the union of the parts is the whole run's directory."""
    from toolbox.hf_output import finish_hf_directory
    from toolbox.tensors.atomic import atomic_directory, ensure_free_space
    from toolbox.tensors.sink import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter

    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata(), shards=shards,
                                   max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        for n, s, d, _ in plan:
            writer.add(n, s, d)
        writer.begin()
        todo = [(n, s, d, emit) for n, s, d, emit in plan if writer.wanted(n)]
        total = sum(TensorInfo(n, s, d).nbytes for n, s, d, _ in todo)
        ensure_free_space(out, total, f"{label} into {out.name}")
        with progress.task(label, total=total, unit="bytes") as task:
            for n, s, d, emit in todo:
                emit(writer)
                task.advance(TensorInfo(n, s, d).nbytes)
        writer.finish()
        if writer.writes_rest:
            cfg = json.loads(json.dumps(config))
            cfg.pop("quantization_config", None)  # FP8 sources are dequantized on read
            finish_hf_directory(staging, src_dir, cfg, stamp)
    return total


def plan_shard_count(plan: list[Planned], max_shard_bytes: int | None = None) -> int:
    """How many safetensors files `write_checkpoint` writes for this plan (from shapes alone, nothing read)."""
    from toolbox.tensors.sink import DEFAULT_MAX_SHARD_BYTES, shard_count

    return shard_count([TensorInfo(n, s, d).nbytes for n, s, d, _ in plan], max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)


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
