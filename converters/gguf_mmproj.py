"""HF Llama 4 vision tower + projector -> an mmproj GGUF for llama.cpp's multimodal runtime (libmtmd).

llama.cpp keeps the vision part in a separate "mmproj" file (architecture `clip`, projector
type `llama4`) loaded beside the text GGUF. Tensors are streamed one at a time (matrices in row
chunks); the vision `post_attention_layernorm` goes to `ln2`, the pre-MLP norm that llama.cpp's
ViT block computes where transformers does (see converters/gguf_mmproj_names.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.gguf_mmproj_names import mmproj_name, name_map
from converters.hf_to_gguf import PROVENANCE_KEY, GGUFResult, Planned, _row_pieces, resolve_outtype
from license.stamp import LicenseOptions
from toolbox.checkpoint import Llama4Checkpoint
from toolbox.errors import UnsupportedModelError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike, resolve
from toolbox.tensors.gguf.quant import FLOAT_TYPES, MMPROJ_OUTTYPES, can_encode, encode

PROJECTOR_TYPE = "llama4"
LLAMA_CPP_ROPE_THETA = 10000.0  # hard-coded for llama4 vision in tools/mtmd/clip.cpp
HF_LAYERNORM_EPS = 1e-5  # transformers builds the vision LayerNorms with the default eps, whatever norm_eps says
HF_IMAGE_MEAN = HF_IMAGE_STD = (0.5, 0.5, 0.5)  # transformers' Llama4ImageProcessor defaults


def mmproj_path_for(gguf_out: str | Path) -> Path:
    """The conventional mmproj file beside a text GGUF: `X.gguf` -> `X.mmproj.gguf`."""
    p = Path(gguf_out)
    return p.with_name(f"{p.name.removesuffix('.gguf')}.mmproj.gguf")


def mmproj_outtype_for(text_outtype: str) -> str:
    """The mmproj type to pair with a text GGUF type: the same where the vision graph takes it, else f16
    (K- and I-quants are for the text model; llama.cpp's own mmproj files are f16/bf16/f32/q8_0)."""
    key = text_outtype.lower()
    return key if key in MMPROJ_OUTTYPES else "f16"


def vision_config(ckpt: Llama4Checkpoint) -> dict[str, Any]:
    vc = ckpt.config.get("vision_config")
    if not ckpt.multimodal or ckpt.vision is None or not isinstance(vc, dict):
        raise UnsupportedModelError(f"{ckpt.path}: a text-only checkpoint ({ckpt.architecture}) has no vision tower",
                                    hint="an mmproj needs a Llama4ForConditionalGeneration checkpoint",
                                    path=ckpt.path)
    return vc


def shuffle_factor(vc: dict[str, Any]) -> int:
    """1 / pixel_shuffle_ratio, the side of the patch square merged into one token (2 for 0.5)."""
    ratio = float(vc.get("pixel_shuffle_ratio", 0.5))
    factor = round(1 / ratio) if ratio > 0 else 0
    return factor if factor > 0 and abs(factor * ratio - 1) < 1e-6 else 0


def preflight(src: ModelLike, outtype: str, *, allow_lossy_config: bool = False
              ) -> tuple[Llama4Checkpoint, str, list[str]]:
    """Everything that can refuse an mmproj conversion, checked before any work (so that a text GGUF and
    its mmproj are written as a pair or not at all): outtype, a vision tower, a config llama.cpp can run."""
    key = outtype.lower()
    if key not in MMPROJ_OUTTYPES:
        raise UsageError(f"unknown mmproj outtype {outtype!r}", hint=f"choose from {', '.join(MMPROJ_OUTTYPES)}")
    ckpt = resolve(src).checkpoint
    assert ckpt.path is not None
    vision_config(ckpt)
    warnings: list[str] = []
    problems = llama_cpp_vision_problems(ckpt)
    if problems:
        msg = f"{ckpt.path}: llama.cpp's llama4 vision graph cannot represent this config: {'; '.join(problems)}"
        if not allow_lossy_config:
            raise UnsupportedModelError(msg, hint="pass --allow-lossy-config to convert anyway (llama.cpp will "
                                        "compute different image embeddings from transformers)", path=ckpt.path)
        warnings.append(msg)
    return ckpt, key, warnings


def llama_cpp_vision_problems(ckpt: Llama4Checkpoint) -> list[str]:
    """What llama.cpp's llama4 vision graph cannot represent (it would compute something else)."""
    vc = vision_config(ckpt)
    v = ckpt.vision
    assert v is not None
    problems = []
    rope = vc.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", vc.get("rope_theta", LLAMA_CPP_ROPE_THETA)))
    if theta != LLAMA_CPP_ROPE_THETA:
        problems.append(f"vision rope_theta={theta} (llama.cpp always uses {LLAMA_CPP_ROPE_THETA:g})")
    if v.channels != 3:
        problems.append(f"num_channels={v.channels} (llama.cpp feeds RGB)")
    if v.image_size % v.patch_size:
        problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    factor = shuffle_factor(vc)
    side = v.image_size // v.patch_size
    if not factor or side % factor:
        problems.append(f"pixel_shuffle_ratio={vc.get('pixel_shuffle_ratio')} with {side} patches per side "
                        "(llama.cpp needs 1/ratio to be an integer dividing the patch grid)")
    elif v.hidden * factor * factor != v.intermediate:
        problems.append(f"pixel-shuffled width {v.hidden * factor * factor} != intermediate_size {v.intermediate}")
    head_dim = v.hidden // v.heads if v.heads else 0
    if not head_dim or v.hidden % v.heads or head_dim % 4:
        problems.append(f"head dim {v.hidden}/{v.heads} (the 2-D rope needs a multiple of 4)")
    if v.projector_input_dim != v.projector_output_dim or v.output_dim != v.projector_output_dim:
        problems.append("projector_input_dim, projector_output_dim and vision_output_dim differ")
    return problems


def _image_norm(directory: Path | None) -> tuple[list[float], list[float]]:
    """image_mean / image_std from the checkpoint's processor files, else transformers' defaults."""
    mean, std = list(HF_IMAGE_MEAN), list(HF_IMAGE_STD)
    for fname in ("preprocessor_config.json", "processor_config.json"):
        f = directory / fname if directory else None
        if f is None or not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        cfg = {**cfg, **(cfg.get("image_processor") or {})} if isinstance(cfg, dict) else {}
        if isinstance(cfg.get("image_mean"), list) and len(cfg["image_mean"]) == 3:
            mean = [float(x) for x in cfg["image_mean"]]
        if isinstance(cfg.get("image_std"), list) and len(cfg["image_std"]) == 3:
            std = [float(x) for x in cfg["image_std"]]
    return mean, std


def qtype_for(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """llama.cpp's rules: vectors, the position table and (except for F16) the patch embedding stay F32."""
    if len(shape) < 2 or gguf_name.startswith("v.position_embd"):
        return "F32"
    if gguf_name.startswith("v.patch_embd"):  # consumed by im2col; llama.cpp keeps it F16 or F32
        return "F16" if outtype == "F16" else "F32"
    if outtype in FLOAT_TYPES or can_encode(outtype, shape[-1]):
        return outtype
    return "F16"


def plan_mmproj(ckpt: Llama4Checkpoint, source: Any, outtype: str) -> list[Planned]:
    """Every tensor of the mmproj, in inventory order, with its type and lazy row pieces."""
    from toolbox.errors import BadInputError

    infos = source.infos()
    expected = {n: s for n, s in ckpt.expected_tensors().items() if n in name_map(list(ckpt.expected_tensors()))}
    missing = [n for n in expected if n not in infos]
    if missing:
        raise BadInputError(f"{source.path}: vision tensors missing: {', '.join(missing[:5])}",
                            hint="run `corral verify` on the checkpoint", path=source.path)
    plan = []
    for hf_name, shape in expected.items():
        if tuple(infos[hf_name].shape) != tuple(shape):
            raise BadInputError(f"{source.path}: {hf_name} has shape {list(infos[hf_name].shape)}, the config "
                                f"implies {list(shape)}", path=source.path)
        gg = mmproj_name(hf_name)
        plan.append(Planned(gg, tuple(shape), qtype_for(gg, tuple(shape), outtype), _row_pieces(source, hf_name),
                            hf_name))
    return plan


def add_mmproj_kv(writer: Any, ckpt: Llama4Checkpoint, outtype: str) -> None:
    """The clip.* keys llama.cpp's clip loader reads for projector type llama4."""
    import gguf

    vc = vision_config(ckpt)
    v = ckpt.vision
    assert v is not None
    writer.add_type(gguf.GGUFType.MMPROJ)
    floats = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16}
    ftype = floats[outtype] if outtype in floats else getattr(gguf.LlamaFileType, f"MOSTLY_{outtype}")
    writer.add_file_type(int(ftype))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_projection_dim(ckpt.text.hidden)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden)
    writer.add_vision_feed_forward_length(v.intermediate)
    writer.add_vision_block_count(v.layers)
    writer.add_vision_head_count(v.heads)
    writer.add_vision_attention_layernorm_eps(HF_LAYERNORM_EPS)
    writer.add_vision_projector_scale_factor(shuffle_factor(vc))
    writer.add_vision_use_gelu(True)
    mean, std = _image_norm(ckpt.path)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def convert_hf_to_mmproj(src: ModelLike, out: str | Path, *, outtype: str = "f16", allow_lossy_config: bool = False,
                         force: bool = False, license_options: LicenseOptions | None = None,
                         progress: Progress = NULL_PROGRESS, **legacy: Any) -> GGUFResult:
    """Write the vision tower and projector of an HF Llama 4 checkpoint as an mmproj GGUF, license-stamped
    (multimodal: the stamp carries the EU restriction on Llama 4's multimodal models)."""
    import gguf
    import numpy as np

    from license.stamp import apply_to_gguf_writer, derive_stamp
    from toolbox.tensors.atomic import atomic_file, check_output_path
    from toolbox.tensors.gguf.writer import GGUFWriter

    opts = LicenseOptions.of(license_options, **legacy)
    model = resolve(src)
    ckpt, key, warnings = preflight(model, outtype, allow_lossy_config=allow_lossy_config)
    out = Path(out).absolute()
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf")
    check_output_path(out, force=force)
    source = model.open_source()
    try:
        gg_type = resolve_outtype(key, source)
        stamp = derive_stamp(model.stamp_input(source), {"op": "convert", "to": "gguf-mmproj", "outtype": gg_type},
                             opts, suffix=f"mmproj-{gg_type.lower()}", multimodal=True,
                             relation=None if gg_type in FLOAT_TYPES else "quantized")
        plan = plan_mmproj(ckpt, source, gg_type)
        total = sum(p.nbytes for p in plan)
        with atomic_file(out, force=force) as tmp:
            writer = GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
            apply_to_gguf_writer(writer, stamp)
            add_mmproj_kv(writer, ckpt, gg_type)
            writer.add_string(PROVENANCE_KEY, json.dumps(ckpt.config, sort_keys=True))
            for p in plan:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                                       raw_dtype=getattr(gguf.GGMLQuantizationType, p.qtype))
            writer.begin_data()
            with progress.task(f"writing {out.name}", total=total, unit="bytes") as task:
                for p in plan:

                    def pieces(p: Planned = p) -> Iterator[Any]:
                        for t in p.pieces():
                            data = encode(t, p.qtype)
                            task.advance(data.nbytes)
                            yield data

                    writer.write_tensor_pieces(p.name, pieces())
            writer.close()
    finally:
        source.close()
    return GGUFResult(paths=[out], outtype=gg_type, tensors=len(plan), bytes=total, warnings=warnings,
                      name=stamp.name)
