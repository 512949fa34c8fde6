"""The one conversion entry point: a `ConvertRequest` in, a `ConvertResult` out.

`corral convert` and the recipe `convert` step only build a request; this module resolves the
source once (a `demo:*` is generated, the config read, at most once), applies the rules that
are not a converter's (the split size, the `--mmproj` pairing), and
dispatches through `converters.registry.PAIRS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike, ModelReference, ResolvedModel, resolve


@dataclass(frozen=True)
class ConvertRequest:
    """What to convert, into what, and how. Options a pair does not take are ignored, as on the CLI."""

    source: ModelLike
    to: str  # gguf, hf or onnx
    output: Path
    outtype: str = "auto"  # GGUF tensor type
    dtype: str = "auto"  # HF output dtype; ONNX: fp32, fp16, bf16 (auto = fp32)
    split_max_size: str | int = 0  # GGUF: split above this size ("50G"); 0: one file
    opset: int | None = None  # ONNX opset (18-23)
    kv_cache: bool = True  # ONNX past/present inputs and outputs
    vision: bool = False  # to onnx: also vision.onnx (+ preprocessor_config.json), converters.onnx_vision
    mmproj: str | None = None  # to gguf: auto|none (write OUT.mmproj.gguf); gguf to hf: the mmproj FILE to merge
    mmproj_outtype: str | None = None  # mmproj tensor type (default: the text type where it fits, else f16)
    allow_lossy_config: bool = False
    force: bool = False
    license: LicenseOptions = field(default_factory=LicenseOptions)
    # to gguf with a mix --outtype: llama-quantize's per-tensor options and importance matrix
    tensor_types: tuple[str, ...] = ()  # REGEX=TYPE, first match wins
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    imatrix: Path | None = None  # llama.cpp's GGUF imatrix or legacy .dat
    include_weights: tuple[str, ...] = ()  # imatrix entries whose name contains one of these (only)
    exclude_weights: tuple[str, ...] = ()
    parts: tuple[int, ...] | None = None  # to gguf, split: only these files of the set (0-based), for fan-out
    # to onnx with dtype int4/int8 (converters.onnx_qops): MatMulNBits/QMoE block size, zero points, accuracy
    block_size: int | None = None  # 32, 64 or 128 (default 32)
    symmetric: bool | None = None  # default symmetric (no zero points)
    accuracy_level: int | None = None  # onnxruntime's 0..4 (default 0)
    # ONNX int4/int8: parts kept float32 (default router, embed); to gguf: parts kept at the source's float
    # type (converters.gguf_keep_float; default none)
    keep_float: tuple[str, ...] | None = None



@dataclass
class ConvertResult:
    """What was written: `paths` (the main artifact first), the JSON document the CLI prints, a one-line
    human summary, and warnings to show."""

    format: str
    paths: list[Path]
    data: dict[str, Any]
    summary: str
    warnings: list[str] = field(default_factory=list)
    name: str = ""


def source_format(request: ConvertRequest) -> str:
    """The format of the request's source, from its name alone (a demo is not generated for this)."""
    from converters.registry import detect_format

    src = request.source
    if isinstance(src, ResolvedModel):
        return detect_format(src.path)
    ref = ModelReference.parse(src)
    return "hf" if ref.kind == "demo" else detect_format(ref.text)


def convert(request: ConvertRequest, progress: Progress = NULL_PROGRESS) -> ConvertResult:
    """Convert as `request` says; UsageError (exit 2) for a pair or option corral does not support."""
    from converters.registry import converter_for

    target = request.to.lower()
    fmt = source_format(request)
    conv = converter_for(fmt, target)  # refuses an unsupported pair before any work
    request, kwargs = _prepare(request, fmt, target)  # a dynamic mix expanded once; the mmproj type follows it
    model = resolve(request.source, progress)
    mm_path = _mmproj_preflight(request, model) if (fmt, target) == ("hf", "gguf") else None
    if mm_path is not None:
        kwargs["multimodal"] = True
    src: Any = model if fmt == "hf" else model.path
    staged = _stage_vision(request, model, progress) if (fmt, target) == ("hf", "onnx") and request.vision else None
    kwargs["vision"] = False  # the text exporter never writes it: staged above, placed below
    try:
        result = conv.load()(src, request.output, force=request.force, license_options=request.license,
                             progress=progress, **{k: v for k, v in kwargs.items() if k in conv.options})
    except BaseException:
        if staged is not None:
            from converters.onnx_vision import drop_vision

            drop_vision(staged[0])
        raise
    out = _describe(target, str(request.source if not isinstance(request.source, ResolvedModel)
                                else request.source.label), result)
    if mm_path is not None:
        _write_mmproj(request, model, mm_path, out, progress)
    if staged is not None:
        _place_vision(staged, out)
    return out


def _stage_vision(request: ConvertRequest, model: ResolvedModel, progress: Progress) -> tuple[Path, Any]:
    """--vision with --to onnx: vision.onnx is exported first (into a partial beside the output) and moved
    into the text model's directory once that is complete: the two are written together or not at all."""
    from converters.onnx_vision import stage_vision

    return stage_vision(model, Path(request.output), dtype=request.dtype, opset=request.opset,
                        kv_cache=request.kv_cache, force=request.force, license_options=request.license,
                        progress=progress)


def _place_vision(staged: tuple[Path, Any], out: ConvertResult) -> None:
    from converters.onnx_vision import place_vision

    vision = place_vision(staged[0], out.paths[0], staged[1])
    out.paths.append(vision.path)
    out.data["vision"] = {"path": str(vision.path), "dtype": vision.dtype, "tensors": vision.tensors,
                          "bytes": vision.bytes, "tokens_per_tile": vision.tokens_per_tile,
                          "image_size": vision.image_size}
    out.data["disk_bytes"] = disk_bytes(out.paths[:1])
    out.warnings.extend(vision.warnings)
    out.summary += f"; vision.onnx ({vision.dtype}, {vision.tensors} tensors, {vision.tokens_per_tile} tokens per tile)"


def gguf_part_count(request: ConvertRequest, progress: Progress = NULL_PROGRESS) -> int:
    """How many files `convert(request)` writes for an HF -> GGUF request (the parts of a split set, 1
    without one), from the plan: a caller can then write each part in its own process (`parts=(i,)`)."""
    from converters.hf_to_gguf import split_part_count

    if request.to.lower() != "gguf" or source_format(request) != "hf":
        raise UsageError(f"{request.source}: only an HF -> GGUF conversion is written in parts")
    request, kwargs = _prepare(request, "hf", "gguf")
    return split_part_count(resolve(request.source, progress), **kwargs)


def expand_dynamic_mix(request: ConvertRequest) -> ConvertRequest:
    """A built-in dynamic mix --outtype (scout-dynamic, ...; converters/gguf_dynamic_mixes.yaml) as the
    llama.cpp mix and per-tensor options it stands for, the request's own options laid over them."""
    from dataclasses import replace

    from converters.gguf_dynamic import expand, is_dynamic

    if request.to.lower() != "gguf" or not is_dynamic(request.outtype):
        return request
    return replace(request, **expand(request.outtype, tensor_types=request.tensor_types,
                                     output_tensor_type=request.output_tensor_type,
                                     token_embedding_type=request.token_embedding_type, pure=request.pure))


def _prepare(request: ConvertRequest, fmt: str, target: str) -> tuple[ConvertRequest, dict[str, Any]]:
    """The request with a dynamic mix expanded, and the converter's options made from that one expansion (the
    mix's name kept for the provenance): expanding twice would let the two disagree."""
    from converters.gguf_dynamic import is_dynamic

    mix = request.outtype.lower() if target == "gguf" and is_dynamic(request.outtype) else None
    expanded = expand_dynamic_mix(request)
    return expanded, _options(expanded, fmt, target, mix)


def _converter_options(request: ConvertRequest, fmt: str, target: str) -> dict[str, Any]:
    """The request's options as the converters take them (validated here, before any work)."""
    return _prepare(request, fmt, target)[1]


def _options(request: ConvertRequest, fmt: str, target: str, mix: str | None) -> dict[str, Any]:
    """`_converter_options` of a request whose dynamic mix (named `mix`) is already expanded."""
    from toolbox.tensors.sink import MIN_SPLIT_BYTES, parse_size

    opts: dict[str, Any] = {"outtype": request.outtype, "allow_lossy_config": request.allow_lossy_config,
                            "opset": request.opset, "kv_cache": request.kv_cache, "vision": request.vision,
                            "multimodal": False}
    if target == "gguf":
        try:
            opts["split_max_size"] = parse_size(request.split_max_size or 0, minimum=MIN_SPLIT_BYTES)
        except ValueError:
            raise UsageError(f"--split-max-size {request.split_max_size!r} is not a size",
                             hint="e.g. 50G or 500M") from None
        opts.update(_quant_options(request, mix))
        opts["parts"] = request.parts
        want = (request.mmproj or "none").lower()
        if want not in ("auto", "none"):
            raise UsageError(f"--mmproj {request.mmproj!r}: with --to gguf use --mmproj auto (or none)",
                             hint="the mmproj file is written beside the output as OUT.mmproj.gguf")
    opts["dtype"] = request.dtype  # the ONNX exporter reads auto as fp32 (converters.onnx_export.DTYPES)
    opts.update(block_size=request.block_size, symmetric=request.symmetric, accuracy_level=request.accuracy_level,
                keep_float=request.keep_float)
    if target == "gguf":  # checked before any work; ONNX checks its own with the int4/int8 options
        from converters.gguf_keep_float import parts_of

        opts["keep_float"] = parts_of(request.keep_float)
    mm = request.mmproj
    opts["mmproj"] = mm if fmt == "gguf" and mm and mm.lower() not in ("auto", "none") else None
    return opts


def _quant_options(request: ConvertRequest, mix: str | None) -> dict[str, Any]:
    """The GGUF options of an expanded request (`expand_dynamic_mix`): not expanded again."""
    return _validated_quant_options(
        {"outtype": request.outtype, "tensor_types": request.tensor_types,
         "output_tensor_type": request.output_tensor_type, "token_embedding_type": request.token_embedding_type,
         "pure": request.pure}, mix, imatrix=request.imatrix, include_weights=request.include_weights,
        exclude_weights=request.exclude_weights)


def gguf_quant_options(outtype: str = "auto", *, tensor_types: Sequence[str] = (),
                       output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                       pure: bool = False, imatrix: str | Path | None = None, include_weights: Sequence[str] = (),
                       exclude_weights: Sequence[str] = ()) -> dict[str, Any]:
    """--outtype and llama-quantize's per-tensor and imatrix options as converters.hf_to_gguf takes them, for
    every HF -> GGUF path (convert, and the merge/prune/extract chains): a built-in dynamic mix name becomes its
    llama.cpp mix and overrides (the name kept in them for the provenance), the user's options laid over it;
    the overrides are validated now, so a bad regex or type name fails before any work."""
    from converters.gguf_dynamic import expand, is_dynamic

    o = expand(outtype, tensor_types=tuple(tensor_types), output_tensor_type=output_tensor_type,
               token_embedding_type=token_embedding_type, pure=pure)
    return _validated_quant_options(o, outtype.lower() if is_dynamic(outtype) else None, imatrix=imatrix,
                                    include_weights=include_weights, exclude_weights=exclude_weights)


def _validated_quant_options(o: dict[str, Any], mix: str | None, *, imatrix: str | Path | None,
                             include_weights: Sequence[str], exclude_weights: Sequence[str]) -> dict[str, Any]:
    """Expanded options (`converters.gguf_dynamic.expand`'s keys) as the converter's keywords, validated."""
    from dataclasses import replace

    from converters.gguf_mix import overrides_of

    overrides = overrides_of(output_tensor_type=o["output_tensor_type"], token_embedding_type=o["token_embedding_type"],
                             pure=o["pure"], tensor_types=list(o["tensor_types"]))
    if mix is not None:
        overrides = replace(overrides, mix=mix)
    return {"outtype": o["outtype"], "overrides": overrides or None, "imatrix": imatrix,
            "include_weights": list(include_weights), "exclude_weights": list(exclude_weights)}


def _mmproj_outtype(request: ConvertRequest) -> str:
    from converters.gguf_mmproj import mmproj_outtype_for

    return request.mmproj_outtype or mmproj_outtype_for(request.outtype)


def _mmproj_preflight(request: ConvertRequest, model: ResolvedModel) -> Path | None:
    """With --mmproj auto: both outputs and the vision config are checked before any work, so that the text
    GGUF and its mmproj are written as a pair or not at all."""
    if (request.mmproj or "none").lower() != "auto":
        return None
    from converters.gguf_mmproj import mmproj_path_for, preflight
    from toolbox.tensors.atomic import check_output_path

    mm_path = mmproj_path_for(request.output)
    check_output_path(Path(request.output).absolute(), force=request.force)
    check_output_path(mm_path.absolute(), force=request.force)
    preflight(model, _mmproj_outtype(request), allow_lossy_config=request.allow_lossy_config)
    return mm_path


def _write_mmproj(request: ConvertRequest, model: ResolvedModel, mm_path: Path, out: ConvertResult,
                  progress: Progress) -> None:
    """The vision tower beside the text GGUF, under the text model's name (one model, two files)."""
    from dataclasses import replace

    from converters.gguf_mmproj import convert_hf_to_mmproj

    mm = convert_hf_to_mmproj(model, mm_path, outtype=_mmproj_outtype(request),
                              allow_lossy_config=request.allow_lossy_config, force=request.force,
                              license_options=replace(request.license, name=out.name), progress=progress)
    out.warnings.extend(mm.warnings)
    out.data["mmproj"] = {"path": str(mm.paths[0]), "outtype": mm.outtype, "tensors": mm.tensors, "bytes": mm.bytes}
    out.paths.append(mm.paths[0])
    out.data["disk_bytes"] = disk_bytes(out.paths)
    out.summary = (f"wrote {', '.join(map(str, out.paths))} ({out.data['outtype']}, {out.data['tensors']} tensors, "
                   f"{out.data['disk_bytes'] / 2**20:.1f} MiB)")


def disk_bytes(paths: list[Path]) -> int:
    """The size on disk of what was written (files, and every file under a directory): what the summary
    reports, since tensor bytes leave out headers, metadata, tokenizer and license files."""
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        elif p.is_file():
            total += p.stat().st_size
    return total


def _describe(target: str, source: str, res: Any) -> ConvertResult:
    """A converter's result as the CLI's JSON document and summary line (`bytes`: tensor data; `disk_bytes`:
    the files written)."""
    if target == "gguf":
        size = disk_bytes(list(res.paths))
        data = {"source": source, "format": "gguf", "outtype": res.outtype, "tensors": res.tensors,
                "bytes": res.bytes, "disk_bytes": size, "paths": [str(p) for p in res.paths]}
        summary = (f"wrote {', '.join(map(str, res.paths))} ({res.outtype}, {res.tensors} tensors, "
                   f"{size / 2**20:.1f} MiB)")
        return ConvertResult("gguf", list(res.paths), data, summary, list(res.warnings), res.name)
    if target == "onnx":
        size = disk_bytes([res.path])
        data = {"source": source, "format": "onnx", "path": str(res.path), "tensors": res.tensors,
                "bytes": res.bytes, "disk_bytes": size, "dtype": res.dtype, "kv_cache": res.kv_cache,
                "opset": res.opset}
        summary = (f"wrote {res.path} ({res.dtype}, opset {res.opset}, "
                   f"{'with' if res.kv_cache else 'without'} KV cache, {res.tensors} tensors, "
                   f"{size / 2**20:.1f} MiB)")
        return ConvertResult("onnx", [res.path], data, summary, list(res.warnings))
    lossy = list(getattr(res, "lossy", []))
    size = disk_bytes([res.path])
    data = {"source": source, "format": "hf", "path": str(res.path), "tensors": res.tensors, "dtype": res.dtype,
            "disk_bytes": size, "lossy": bool(lossy), "lossy_reasons": lossy}
    return ConvertResult("hf", [res.path], data, f"wrote {res.path} ({res.tensors} tensors, {res.dtype}, "
                         f"{size / 2**20:.1f} MiB{', lossy' if lossy else ''})", list(getattr(res, "warnings", [])))
