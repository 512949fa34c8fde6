"""HF Llama 4 checkpoint -> ONNX text-generation model with KV cache, weights in external data.

How memory stays bounded: the decoder (converters.onnx_model) is built on the meta device with
the real config and traced once by torch.onnx (dynamo, optimize=False, so initializers keep the
PyTorch parameter names); every initializer is then pointed at its place in `model.onnx.data`, and
the weights are streamed there from the safetensors source one tensor (or one expert) at a time.

Output directory: model.onnx (graph + license stamp in metadata_props), model.onnx.data,
config.json (the text model, Llama4ForCausalLM), generation_config.json, tokenizer files and the
license sidecars. metadata_props also carry the tensor-name map that `--to hf` needs.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.onnx_weights import DATA_FILE, external_tensor, layout, write_data
from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, UnsupportedModelError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike, resolve
from toolbox.tensors.dtypes import ONNX_DTYPES

MODEL_FILE = "model.onnx"
# "auto" is fp32: ONNX has no "keep the source's type" (onnxruntime's CPU provider runs fp32 everywhere)
DTYPES = ONNX_DTYPES
OPSETS = range(18, 24)  # what torch.onnx emits and onnxruntime 1.20+ runs
DEFAULT_OPSET = 18
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# metadata_props keys (beside the license stamp's)
KEY_TENSOR_MAP = "corral.onnx.tensor_map"  # JSON {initializer: checkpoint tensor name}
KEY_DTYPE = "corral.onnx.dtype"
KEY_KV_CACHE = "corral.onnx.kv_cache"
KEY_MOE = "corral.onnx.moe"
KEY_QUANT = "corral.onnx.quant"  # JSON {"config": {...}, "tensors": {initializer: [checkpoint tensor, part]}}
INV_FREQ = "rope_inv_freq"


@dataclass
class OnnxResult:
    path: Path
    tensors: int
    bytes: int
    dtype: str
    kv_cache: bool
    opset: int
    warnings: list[str] = field(default_factory=list)


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config as a Llama4ForCausalLM config.json (what the ONNX graph is)."""
    tc = dict(config.get("text_config") or config)
    tc["model_type"] = "llama4_text"
    tc["architectures"] = ["Llama4ForCausalLM"]
    for key in ("id2label", "label2id"):
        tc.pop(key, None)
    return tc


def tensor_map(param_names: list[str], multimodal: bool) -> dict[str, str]:
    """ONNX initializer (Llama4ForCausalLM parameter) name -> checkpoint tensor name."""
    return {n: f"language_model.{n}" if multimodal else n for n in param_names}


def resolve_dtype(dtype: str) -> str:
    """The torch type the graph computes in (int4/int8: float32 activations, weights packed)."""
    key = str(dtype).lower()
    if key not in DTYPES:
        raise BadInputError(f"unsupported ONNX dtype {dtype!r}", hint="choose fp32, fp16, bf16, int8 or int4")
    return DTYPES[key]


def resolve_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if opset not in OPSETS:
        raise BadInputError(f"unsupported ONNX opset {opset}",
                            hint=f"choose {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    return int(opset)


def build_module(tc: dict[str, Any], torch_dtype: Any, *, kv_cache: bool, moe: str = "auto",
                 device: str = "meta") -> Any:
    """The export module for this text config, parameters on `device` (meta: no memory)."""
    import torch

    from converters.onnx_model import Llama4TextForOnnx, TextDims, rope_inv_freq

    dims = TextDims.from_text_config(tc)
    inv, scale = rope_inv_freq(tc)
    with torch.device(device):
        module = Llama4TextForOnnx(dims, torch.empty(inv.shape), scale, kv_cache=kv_cache, moe=moe)
    module = module.to(torch_dtype)
    module.register_buffer(INV_FREQ, inv.to(device), persistent=False)
    module.inv_freq_value = inv  # the real values, for the data file (the buffer may be on meta)
    return module.eval()


def export_graph(module: Any, *, kv_cache: bool, opset: int, device: str = "meta", quantized: bool = False) -> Any:
    """Trace the module once with torch.onnx (dynamo); returns the onnx_ir Model (no weights read)."""
    import torch

    from converters.onnx_model import example_inputs, io_names

    d = module.d
    dtype = next(module.parameters()).dtype
    inputs = tuple(t.to(device) for t in example_inputs(d, kv_cache, dtype))
    ins, outs = io_names(d.layers, kv_cache)
    batch, seq, total = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("total_sequence")
    past = torch.export.Dim("past_sequence")
    shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total if kv_cache else seq}, {0: batch, 1: seq}]
    if kv_cache:
        shapes.append(tuple({0: batch, 2: past} for _ in range(2 * d.layers)))
    extra: dict[str, Any] = {}
    if quantized:
        from converters.onnx_qops import TRANSLATIONS

        extra["custom_translation_table"] = TRANSLATIONS()
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and similar notes
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, inputs, input_names=ins, output_names=outs,
                                        dynamic_shapes=tuple(shapes), dynamo=True, optimize=False,
                                        opset_version=opset, verbose=False, **extra)
        except Exception as exc:  # torch.export / translation failures
            raise UnsupportedModelError(f"torch.onnx could not export this model ({_summary(exc)})",
                                        hint="rerun with --verbose for the exporter's report") from exc
        finally:
            quiet.setLevel(level)
    return program.model


def _summary(exc: BaseException) -> str:
    """The line of torch.onnx's long report that says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    after = [ln for i, ln in enumerate(lines) if i and lines[i - 1].startswith("## Exception summary")]
    return (after or lines or [type(exc).__name__])[0][:300]


def convert_hf_to_onnx(src: ModelLike, out_dir: str | Path, *, dtype: str = "fp32", kv_cache: bool = True,
                       opset: int | None = None, force: bool = False, vision: bool = False, moe: str = "auto",
                       license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                       block_size: int | None = None, symmetric: bool | None = None,
                       accuracy_level: int | None = None, keep_float: Any = None, **legacy: Any) -> OnnxResult:
    """Export the text model of a Llama 4 checkpoint to ONNX (KV cache, sparse MoE, external data), stamped.

    `moe`: "auto" gathers only the routed experts when fewer token-expert pairs than experts are routed
    (decoding) and runs the dense formulation otherwise (prefill: memory for activations only, not one
    weight copy per token); "sparse" always gathers; "dense" always computes every expert for every
    token, as the stock transformers module does (for the benchmark).

    `dtype` int4/int8: linear weights as MatMulNBits and routed experts as QMoE (converters.onnx_qops),
    quantized while streaming in `block_size` blocks (symmetric, or with zero points), `keep_float`
    parts (default router and embeddings; norms always) in float32."""
    import torch

    from license.stamp import derive_stamp
    from toolbox.tensors.atomic import check_output_path

    opts = LicenseOptions.of(license_options, **legacy)
    if vision:
        raise BadInputError("convert_hf_to_onnx exports the text model only",
                            hint="images: toolbox.convert with ConvertRequest(vision=True) (converters.onnx_vision)")
    if moe not in ("auto", "sparse", "dense"):
        raise BadInputError(f"unknown MoE formulation {moe!r}", hint="auto, sparse or dense")
    from converters.onnx_qops import quant_config, quantize_module

    qcfg = quant_config(dtype, block_size, symmetric, accuracy_level, keep_float)
    torch_dtype = getattr(torch, resolve_dtype(dtype))
    opset = resolve_opset(opset)
    check_output_path(Path(out_dir), force=force)
    model = resolve(src)
    ckpt = model.checkpoint
    assert ckpt.path is not None
    tc = text_config_of(ckpt.config)
    dtype_name = f"int{qcfg.bits}" if qcfg else {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
        str(torch_dtype).removeprefix("torch.")]
    with model.open_source() as source:
        stamp = derive_stamp(model.stamp_input(source), {"op": "convert", "to": "onnx", "dtype": dtype_name,
                                                         "kv_cache": kv_cache}, opts, suffix=dtype_name)
        module = build_module(tc, torch_dtype, kv_cache=kv_cache, moe=moe)
        plan = quantize_module(module, qcfg) if qcfg else None
        params = {n: tuple(p.shape) for n, p in module.named_parameters()}
        tmap = tensor_map(list(params), ckpt.multimodal)
        infos = source.infos()
        _check_weights(ckpt.path, tmap, params, infos)
        if plan is not None:
            plan.prefix_sources("language_model." if ckpt.multimodal else "")
            _check_weights(ckpt.path, {s: s for s in plan.shapes}, plan.shapes, infos)
        with progress.task("tracing the graph (torch.onnx, about a minute)", total=None):  # spinner + elapsed
            model = export_graph(module, kv_cache=kv_cache, opset=opset, quantized=plan is not None)
        total, placed = _write(model, module, tmap, source, torch_dtype, Path(out_dir), stamp, tc, ckpt.path,
                               extra={KEY_TENSOR_MAP: json.dumps(tmap, separators=(",", ":")), KEY_DTYPE: dtype_name,
                                      KEY_KV_CACHE: "true" if kv_cache else "false",
                                      KEY_MOE: {"auto": "gather-when-decoding", "sparse": "gather",
                                                "dense": "dense"}[moe]},
                               force=force, progress=progress, plan=plan)
    notes = ["bf16: onnxruntime's CPU provider has no bf16 kernels for several ops (TopK, Expand); run this "
             "model with a GPU provider, or export fp16/fp32 for CPU"] if dtype_name == "bf16" else []
    return OnnxResult(Path(out_dir), placed, total, dtype_name, kv_cache, opset, notes)


def _check_weights(path: Path, tmap: dict[str, str], params: dict[str, tuple[int, ...]], infos: dict[str, Any]
                   ) -> None:
    """Refuse, before anything is written, weights that do not match what config.json implies."""
    for onnx_name, hf_name in tmap.items():
        want = params[onnx_name]
        info = infos.get(hf_name)
        if info is None or tuple(info.shape) != want:
            found = "missing" if info is None else f"shape {tuple(info.shape)}"
            raise BadInputError(f"{path}: tensor {hf_name} is {found}, config.json implies {want}",
                                hint="the weights do not match config.json", path=path)


def _strip_node_metadata(graph: Any) -> None:
    """Drop tracing metadata (stack traces with this machine's paths; ~1 MB per 4 layers), subgraphs too."""
    import onnx

    for node in graph.node:
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_node_metadata(attr.g)


def _write(model: Any, module: Any, tmap: dict[str, str], source: Any, torch_dtype: Any, out_dir: Path,
           stamp: Any, tc: dict[str, Any], src_dir: Path, *, extra: dict[str, str], force: bool,
           progress: Progress, plan: Any = None) -> tuple[int, int]:
    """Point the initializers at model.onnx.data, save the stamped graph, stream the weights, add the files."""
    import onnx
    import onnx_ir as ir
    import torch

    from license.stamp import apply_to_onnx, write_sidecars
    from toolbox.tensors.atomic import atomic_directory

    inits = model.graph.initializers
    quant = plan.specs if plan is not None else {}
    unknown = sorted(set(inits) - set(tmap) - set(quant) - {INV_FREQ})
    if unknown:
        raise UnsupportedModelError(f"the traced graph has initializers corral cannot fill: {', '.join(unknown[:5])}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    entries = [(n, tmap.get(n), tuple(int(s) for s in inits[n].shape)) for n in inits]
    sizes = {n: 4 if n == INV_FREQ else itemsize for n in inits}
    sizes.update({n: int(inits[n].dtype.itemsize) for n in quant})  # uint8 blocks, float32 scales
    placed = layout(entries, sizes)
    if plan is not None:
        extra = {**extra, KEY_QUANT: json.dumps({"config": plan.config.as_json(), "tensors": {
            n: [s.source, s.part] for n, s in quant.items()}}, separators=(",", ":"))}
    with atomic_directory(out_dir, force=force) as staging:
        for p in placed:
            init = inits[p.name]
            init.const_value = external_tensor(p, init.const_value.dtype, staging)
        proto = ir.serde.serialize_model(model)  # references only: no weight is read or written here
        _strip_node_metadata(proto.graph)
        apply_to_onnx(proto, stamp)
        for key, text in extra.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, text
        onnx.save_model(proto, str(staging / MODEL_FILE))
        total = write_data(staging / DATA_FILE, [p for p in placed if p.name not in quant], source, torch_dtype,
                           values={INV_FREQ: module.inv_freq_value}, progress=progress)
        if plan is not None:
            from converters.onnx_quant_weights import write_quant_data

            total += write_quant_data(staging / DATA_FILE, [p for p in placed if p.name in quant], plan, source,
                                      progress=progress)
        tc = {**tc, "dtype": str(torch_dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(src_dir, staging)
        if module.kv_cache:
            from converters.onnx_genai import write_genai_config

            write_genai_config(staging, tc, src_dir)
        write_sidecars(staging, stamp)
    return total, len(placed)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and generation config beside the model (whatever of them the source has)."""
    copied = []
    for filename in TOKENIZER_FILES:
        if (src / filename).is_file():
            shutil.copyfile(src / filename, dst / filename)
            copied.append(filename)
    return copied

