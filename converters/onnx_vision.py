"""HF Llama 4 vision encoder + projector -> `vision.onnx` beside the text model, weights in external data.

`vision.onnx`: pixel_values [tiles, 3, S, S] float32 (S = vision_config.image_size; the tile axis is
dynamic) -> image_features [tiles, tokens_per_tile, text hidden], in the export dtype: one row per
`<|patch|>` token of the prompt, tiles in order (what transformers merges with masked_scatter).
Memory stays bounded as for the text model: the module (converters.onnx_vision_model) is traced on
the meta device and the weights are streamed into `vision.onnx.data` one tensor at a time.
`preprocessor_config.json` beside it holds the image processor settings that feed it.

`export_vision` writes into a partial directory beside the output before the text model is exported
(the trace is what can fail); `toolbox.convert` moves the files in once the text model is complete.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, UnsupportedModelError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ResolvedModel

VISION_FILE = "vision.onnx"
VISION_DATA = "vision.onnx.data"
PROCESSOR_FILE = "preprocessor_config.json"
VISION_FILES = (VISION_FILE, VISION_DATA, PROCESSOR_FILE)
INPUT, OUTPUT = "pixel_values", "image_features"
KEY_VISION = "corral.onnx.vision"  # JSON: image size, tokens per tile, image token id (metadata_props)
FLOAT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# transformers' Llama4ImageProcessor class defaults (image_processing_llama4.py); a source's file overrides them
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "image_processor_type": "Llama4ImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_patches": 16, "resize_to_max_canvas": False,
}


@dataclass
class VisionResult:
    path: Path  # vision.onnx
    tensors: int
    bytes: int
    dtype: str
    tokens_per_tile: int
    image_size: int
    stamp: Any = None  # the multimodal stamp (license.stamp.Stamp) the graph carries
    image_token_id: int = 200092
    warnings: list[str] = field(default_factory=list)


def vision_layout(config: dict[str, Any]) -> dict[str, int]:
    """image size, patch size, tokens per tile and the image token id; refuses what the graph cannot take."""
    vc = config.get("vision_config")
    if not isinstance(vc, dict) or "Llama4ForConditionalGeneration" not in (config.get("architectures") or []):
        raise UnsupportedModelError("a text-only checkpoint has no vision encoder to export",
                                    hint="--vision needs a Llama4ForConditionalGeneration checkpoint")
    size, patch = int(vc.get("image_size", 0)), int(vc.get("patch_size", 0))
    ratio = float(vc.get("pixel_shuffle_ratio", 0.5))
    side = size // patch if patch else 0
    merged = side * ratio
    if not side or size % patch or merged != int(merged) or int(vc.get("num_channels", 3)) != 3:
        raise UnsupportedModelError(f"vision_config image_size {size}, patch_size {patch}, pixel_shuffle_ratio "
                                    f"{ratio}: not a square patch grid that the pixel shuffle divides (RGB)",
                                    hint="the vision config does not match Llama 4's encoder")
    return {"image_size": size, "patch_size": patch, "tokens_per_tile": int(merged) ** 2,
            "image_token_id": int(config.get("image_token_index", config.get("image_token_id", 200092)))}


def processor_settings(src_dir: Path | None, config: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json for vision.onnx: the source's settings (transformers' defaults where it has
    none), with `size` and `patch_size` those the graph was traced for."""
    lay = vision_layout(config)
    out = dict(PROCESSOR_DEFAULTS)
    f = src_dir / PROCESSOR_FILE if src_dir else None
    if f is not None and f.is_file() and f.stat().st_size < 1 << 20:
        try:
            given = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{f}: not JSON ({exc})", path=f) from None
        if isinstance(given, dict):
            out.update({k: v for k, v in given.items() if k in PROCESSOR_DEFAULTS})
            size = given.get("size") or {}
            if isinstance(size, dict) and size and (size.get("height"), size.get("width")) != (lay["image_size"],) * 2:
                raise BadInputError(f"{f}: size {size} differs from vision_config.image_size {lay['image_size']}",
                                    hint="the processor and the vision encoder disagree", path=f)
    out["size"] = {"height": lay["image_size"], "width": lay["image_size"]}
    out["patch_size"] = lay["patch_size"]
    out["corral_vision"] = {"model": VISION_FILE, "input": INPUT, "output": OUTPUT, **lay,
                            "pixel_shuffle_ratio": float(config["vision_config"].get("pixel_shuffle_ratio", 0.5))}
    return out


def _trace(module: Any, opset: int) -> Any:
    """torch.onnx (dynamo) on the meta-device module: the onnx_ir Model, no weight read."""
    import torch

    size = module.image_size
    example = (torch.zeros((2, 3, size, size), device="meta"),)  # 2: torch.export specialises 0 and 1
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, example, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("tiles")},), dynamo=True,
                                        optimize=False, opset_version=opset, verbose=False)
        except Exception as exc:  # torch.export / translation failures
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise UnsupportedModelError(f"torch.onnx could not export the vision encoder ({first[:300]})") from exc
        finally:
            quiet.setLevel(level)
    return program.model


def export_vision(model: ResolvedModel, out_dir: Path, *, dtype: str = "fp32", opset: int | None = None,
                  suffix: str | None = None, kv_cache: bool = True, license_options: LicenseOptions | None = None,
                  progress: Progress = NULL_PROGRESS) -> VisionResult:
    """Write vision.onnx (+ .data) and preprocessor_config.json into the existing directory `out_dir`,
    stamped multimodal under the name the text model gets (`suffix`: the text export's dtype name); the stamp
    records the whole export (text and vision), since `place_vision` puts it on every graph of the directory."""
    import torch

    from converters.onnx_export import resolve_dtype, resolve_opset
    from converters.onnx_vision_model import Llama4VisionForOnnx
    from license.stamp import derive_stamp

    ckpt = model.checkpoint
    lay = vision_layout(ckpt.config)
    settings = processor_settings(ckpt.path, ckpt.config)
    torch_dtype = getattr(torch, resolve_dtype(dtype))
    name = FLOAT_NAMES[str(torch_dtype).removeprefix("torch.")]
    opset = resolve_opset(opset)
    module = Llama4VisionForOnnx(ckpt.config).to(torch_dtype).eval()
    for key, value in module.rope_values.items():  # the rotation stays float32, as in transformers
        module.register_buffer(key, torch.empty(value.shape, device="meta"), persistent=False)
    params = {n: tuple(p.shape) for n, p in module.named_parameters()}
    with model.open_source() as source:
        infos = source.infos()
        for n, shape in params.items():
            info = infos.get(n)
            if info is None or tuple(info.shape) != shape:
                found = "missing" if info is None else f"shape {tuple(info.shape)}"
                raise BadInputError(f"{ckpt.path}: vision tensor {n} is {found}, config.json implies {shape}",
                                    hint="the weights do not match config.json", path=ckpt.path)
        operation = {"op": "convert", "to": "onnx", "dtype": suffix or name, "kv_cache": kv_cache, "vision": name}
        stamp = derive_stamp(model.stamp_input(source), operation, LicenseOptions.of(license_options),
                             suffix=suffix or name, multimodal=True)
        with progress.task("tracing the vision encoder (torch.onnx)", total=None):
            graph = _trace(module, opset)
        props = {KEY_VISION: json.dumps(lay, sort_keys=True), "corral.onnx.dtype": name}
        total, placed = _write(graph, module, source, torch_dtype, out_dir, stamp, props, progress)
    (out_dir / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return VisionResult(out_dir / VISION_FILE, placed, total, name, lay["tokens_per_tile"], lay["image_size"], stamp,
                        lay["image_token_id"])


def _write(graph: Any, module: Any, source: Any, torch_dtype: Any, out_dir: Path, stamp: Any,
           props: dict[str, str], progress: Progress) -> tuple[int, int]:
    """Point the initializers at vision.onnx.data, save the stamped graph, stream the weights."""
    import onnx
    import onnx_ir as ir
    import torch

    from converters.onnx_export import _strip_node_metadata
    from converters.onnx_weights import layout, write_data
    from license.stamp import apply_to_onnx

    inits = graph.graph.initializers
    params = dict(module.named_parameters())
    unknown = sorted(set(inits) - set(params) - set(module.rope_values))
    if unknown:
        raise UnsupportedModelError(f"the traced vision graph has initializers corral cannot fill: {unknown[:5]}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    entries = [(n, n if n in params else None, tuple(int(s) for s in inits[n].shape)) for n in inits]
    placed = layout(entries, {n: 4 if n in module.rope_values else itemsize for n in inits})
    for p in placed:
        init = inits[p.name]
        init.const_value = ir.ExternalTensor(VISION_DATA, p.offset, p.length, init.const_value.dtype,
                                             shape=ir.Shape(p.shape), name=p.name, base_dir=str(out_dir))
    proto = ir.serde.serialize_model(graph)
    _strip_node_metadata(proto.graph)
    apply_to_onnx(proto, stamp)
    for key, text in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    total = write_data(out_dir / VISION_DATA, placed, source, torch_dtype, values=module.rope_values,
                       progress=progress)
    onnx.save_model(proto, str(out_dir / VISION_FILE))  # last: a vision.onnx means its data is complete
    return total, len(placed)


def stage_vision(model: ResolvedModel, output: Path, *, dtype: str = "fp32", opset: int | None = None,
                 kv_cache: bool = True, force: bool = False, license_options: LicenseOptions | None = None,
                 progress: Progress = NULL_PROGRESS) -> tuple[Path, VisionResult]:
    """Export the vision encoder into a partial directory beside `output` (before the text model: what can
    refuse or fail does so before anything is written); `place_vision` moves it in, `drop_vision` discards it."""
    from converters.onnx_export import DTYPES, resolve_dtype
    from toolbox.tensors.atomic import check_output_path, new_partial

    vision_layout(model.checkpoint.config)
    key = str(dtype).lower()
    # a quantized text export (int4/int8) keeps the small vision encoder in fp32
    floating = key in DTYPES and key not in ("int4", "int8")
    vision_dtype = key if floating else "fp32"
    suffix = FLOAT_NAMES[resolve_dtype(key)] if floating else key  # the text model's name suffix
    check_output_path(Path(output).absolute(), force=force)
    partial = new_partial(Path(output).absolute(), directory=True, tag="vision-")
    try:
        result = export_vision(model, partial, dtype=vision_dtype, opset=opset, suffix=suffix, kv_cache=kv_cache,
                               license_options=license_options, progress=progress)
    except BaseException:
        drop_vision(partial)
        raise
    return partial, result


def place_vision(partial: Path, out_dir: Path, result: VisionResult) -> VisionResult:
    """Move the staged files into the finished text export and write the inputs_embeds graphs; every graph and
    the license card then carry the one multimodal stamp (Llama 4's EU clause covers the whole model)."""
    import os

    from license.stamp import write_sidecars

    for filename in VISION_FILES:
        os.replace(partial / filename, out_dir / filename)
    drop_vision(partial)
    restamp_graph(out_dir / "model.onnx", result.stamp)
    write_sidecars(out_dir, result.stamp)
    from converters.onnx_vision_decoder import write_embeds_graphs

    notes = []
    try:
        for graph in write_embeds_graphs(out_dir, result.image_token_id):
            restamp_graph(graph, result.stamp)
    except UnsupportedModelError as exc:  # a model.onnx corral cannot retrace (edited, no quant record)
        notes.append(f"no embedding.onnx / decoder_embeds.onnx: {exc.message}")
    return VisionResult(out_dir / VISION_FILE, result.tensors, result.bytes, result.dtype, result.tokens_per_tile,
                        result.image_size, result.stamp, result.image_token_id, notes)


def drop_vision(partial: Path) -> None:
    import shutil

    from toolbox.tensors.atomic import release_partial

    shutil.rmtree(partial, ignore_errors=True)
    release_partial(partial)


def restamp_graph(file: Path, stamp: Any) -> None:
    """Put `stamp` on an ONNX graph file in place (the graph only: its external data is not touched)."""
    import onnx

    from license.stamp import apply_to_onnx
    from toolbox.tensors.atomic import atomic_file

    proto = onnx.load(str(file), load_external_data=False)
    apply_to_onnx(proto, stamp)
    with atomic_file(file, force=True) as tmp:
        onnx.save_model(proto, str(tmp))
