"""GGUF (written by corral or llama.cpp) -> HF safetensors checkpoint, streamed.

Experts are re-fused (gate/up) and transposed back, the router and norms are cast back
from F32, `rope_freqs` is dropped, names and config are restored. Config items GGUF cannot
hold come from the config corral stored in the file (`corral.hf_config`) or, for files
written by other tools, from llama.cpp's own defaults. Without the vision tower (which GGUF
keeps in a separate mmproj file) the result is a text-only `Llama4ForCausalLM`; given the
mmproj (`mmproj=`, read by converters/gguf_mmproj_to_hf.py) it is the full `Llama4ForConditionalGeneration`.
F32/F16/BF16 round trips are bit-exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.gguf_names import BLOCK_TENSORS, GLOBAL_TENSORS, gguf_name
from license.stamp import LicenseOptions
from toolbox.checkpoint import from_config
from toolbox.errors import UnsupportedModelError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.dtypes import HF_OUT_DTYPES, TORCH_NAME
from toolbox.tensors.finite import cast_checked
from toolbox.tensors.gguf.reader import GGUFFile

PROVENANCE_KEY = "corral.hf_config"
OUT_DTYPES = HF_OUT_DTYPES


@dataclass
class HFResult:
    path: Path
    tensors: int
    dtype: str
    lossy: list[str] = field(default_factory=list)  # why the weights are not the source's exactly (empty: exact)

    @property
    def warnings(self) -> list[str]:
        return [f"lossy conversion: {why}" for why in self.lossy]


FLOAT_TYPES = ("F32", "F16", "BF16")


def loss_reasons(types: set[str], weights: set[str], out: str) -> list[str]:
    """Why an HF output in `out` (a safetensors float type) is not exact: some tensor (of GGUF `types`) was
    dequantized (the quantization error stays in the weights), or the main weights (of `weights`) narrowed
    (F32 to 16 bits; F16 and BF16 into each other: mantissa or range). Routers and norms, which llama.cpp
    keeps in F32 whatever the source had, do not count as narrowed."""
    quant = sorted(t for t in types if t not in FLOAT_TYPES)
    reasons = [f"dequantized from {', '.join(quant)}: the quantization error stays in the weights"] if quant else []
    narrowed = sorted(t for t in weights if t in FLOAT_TYPES and t != out and out != "F32")
    if narrowed:
        reasons.append(f"narrowed {', '.join(narrowed)} to {out} (pass --dtype f32 to keep every value)")
    return reasons


def dequantized_name(name: str) -> str:
    """`Llama-4-Scout-q4_k_m` -> `Llama-4-Scout-dequantized`: the quant type no longer names the output's
    format (the provenance keeps where it came from)."""
    from toolbox.tensors.gguf.quant import ALL_OUTTYPES

    lower = name.lower()
    for t in sorted((t for t in ALL_OUTTYPES if t != "auto"), key=len, reverse=True):
        if lower.endswith((f"-{t}", f"_{t}", f".{t}")):
            name = name[: -len(t) - 1]
            break
    return name if name.endswith("-dequantized") else f"{name}-dequantized"


def _text_config_from_kv(g: GGUFFile) -> dict[str, Any]:
    """A Llama 4 text config from GGUF keys plus llama.cpp's hard-coded values."""
    experts = g.arch_number("expert_count", 0)
    layers = g.arch_number("block_count")
    step = g.arch_number("interleave_moe_layer_step", 1)
    heads = g.arch_number("attention.head_count", minimum=1)
    hidden = g.arch_number("embedding_length")
    tc: dict[str, Any] = {
        "model_type": "llama4_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": g.arch_number("attention.head_count_kv", heads),
        "head_dim": g.arch_number("attention.key_length", hidden // heads),
        "intermediate_size": g.arch_number("expert_feed_forward_length"),
        "intermediate_size_mlp": g.arch_number("feed_forward_length"),
        "num_local_experts": experts,
        "num_experts_per_tok": g.arch_number("expert_used_count", 1),
        "interleave_moe_layer_step": step,
        "max_position_embeddings": g.arch_number("context_length", 131072),
        "rms_norm_eps": g.arch_number("attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        "vocab_size": g.arch_number("vocab_size", len(g.list_key("tokenizer.ggml.tokens"))),
        "attention_chunk_size": 8192,
        "use_qk_norm": experts != 128,
        "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": g.arch_number("rope.freq_base", 500000.0, kind=float)},
    }
    for key, gkey in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("pad_token_id",
                                                                       "tokenizer.ggml.padding_token_id")):
        if g.get(gkey) is not None:
            tc[key] = g.number(gkey)
    if g.get("tokenizer.ggml.eos_token_id") is not None:
        tc["eos_token_id"] = g.number("tokenizer.ggml.eos_token_id")
    return tc


def hf_config_for(g: GGUFFile) -> dict[str, Any]:
    """The HF config of the text model in this GGUF (text-only Llama4ForCausalLM)."""
    stored = g.json_field(PROVENANCE_KEY)  # bounded JSON: depth, duplicate keys, NaN refused (exit 3)
    if stored:
        cfg = stored
        tc = dict(cfg.get("text_config") or cfg)
    else:
        tc = _text_config_from_kv(g)
    tc["model_type"] = "llama4_text"
    tc["architectures"] = ["Llama4ForCausalLM"]
    dtype = (stored.get("dtype") if stored else None) or tc.get("dtype") or "bfloat16"
    tc["dtype"] = dtype
    return tc


def convert_gguf_to_hf(src: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
                       mmproj: str | Path | None = None, license_options: LicenseOptions | None = None,
                       progress: Progress = NULL_PROGRESS, **legacy: Any) -> HFResult:
    """Convert a llama4 GGUF (or split set) back to an HF checkpoint directory, license-stamped.

    With `mmproj` (the vision tower's mmproj GGUF) the output is the full Llama4ForConditionalGeneration."""
    import torch

    from license.stamp import write_sidecars
    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.safetensors_format import TORCH_TO_ST
    from toolbox.tensors.sink import SafetensorsWriter

    opts = LicenseOptions.of(license_options, **legacy)
    g = GGUFFile(src)
    if g.architecture != "llama4":
        raise UnsupportedModelError(f"{g.path}: GGUF architecture {g.architecture!r} is not llama4", path=g.path)
    if dtype not in OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, f16 or f32")
    config = hf_config_for(g)
    vision = None
    if mmproj is not None:
        from converters.gguf_mmproj_to_hf import MmprojFile

        vision = MmprojFile(mmproj)
        config = vision.full_config(config, g.json_field(PROVENANCE_KEY))
    ckpt = from_config(config)
    st_dtype, lossy = output_dtype(g, dtype)
    stamp = hf_stamp(g, src, lossy, opts, mmproj=mmproj)
    config["dtype"] = TORCH_NAME[st_dtype]
    torch_dtype = getattr(torch, TORCH_NAME[st_dtype])
    inventory = ckpt.expected_tensors()
    global_map = global_names(ckpt)  # HF name -> GGUF name outside the blocks
    vision_map = vision.gguf_names(list(inventory)) if vision is not None else {}
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
        for name, shape in inventory.items():
            writer.add(name, shape, TORCH_TO_ST[str(torch_dtype).removeprefix("torch.")])
        writer.begin()
        with progress.task("writing", total=len(inventory), unit="tensors") as task:
            for name, shape in inventory.items():
                if name in vision_map:
                    assert vision is not None
                    tensor = vision.load(vision_map[name]).reshape(shape)
                    writer.write(name, cast_checked(tensor, torch_dtype, name, str(vision.path)).contiguous())
                else:
                    _write_one(g, writer, name, shape, global_map, torch_dtype)
                task.advance()
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        from converters.gguf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(g, staging)
        write_sidecars(staging, stamp)
    return HFResult(Path(out), len(inventory), st_dtype, lossy)


def output_dtype(g: GGUFFile, dtype: str) -> tuple[str, list[str]]:
    """The safetensors dtype an HF output of `g` gets for --dtype `dtype` (auto: the GGUF's one float type, else
    BF16) and why that output is not exact (`loss_reasons`)."""
    types = {g.type_name(n) for n in g.tensors if n.endswith(("_exps.weight", "attn_q.weight"))}
    st_dtype = OUT_DTYPES[dtype] or next((t for t in ("F32", "BF16", "F16") if types == {t}), "BF16")
    return st_dtype, loss_reasons({g.type_name(n) for n in g.tensors}, types, st_dtype)


def hf_stamp(g: GGUFFile, src: str | Path, lossy: list[str], opts: LicenseOptions,
             mmproj: str | Path | None = None) -> Any:
    """The stamp of the HF model read from `g`: the GGUF's carried stamp and name (renamed `-dequantized` when
    a quant type no longer names the weights), then this conversion."""
    from license.stamp import StampInput, default_name, derive_stamp

    carried = {k: v for k, v in g.fields.items() if k.startswith("corral.") and isinstance(v, str)}
    name = g.get("general.name")
    if any(why.startswith("dequantized") for why in lossy):
        name = dequantized_name(str(name or default_name(Path(src).name)))
    op = {"op": "convert", "to": "hf", "from": "gguf", **({"lossy": True} if lossy else {})}
    return derive_stamp(StampInput(Path(src).name, prior=carried, carried_name=name), op, opts,
                        multimodal=mmproj is not None,
                        extra={"mmproj": Path(mmproj).name} if mmproj is not None else None)


def _write_one(g: GGUFFile, writer: Any, name: str, shape: tuple[int, ...], global_map: dict[str, str],
               dtype: Any) -> None:
    for _, tensor in hf_slices(g, name, shape, global_map):
        writer.write(name, cast_checked(tensor, dtype, name, str(g.path)).contiguous())  # f16 may overflow: refused


def global_names(ckpt: Any) -> dict[str, str]:
    """HF name -> GGUF name for the tensors outside the blocks (embeddings, final norm, output)."""
    p = ckpt.text_prefix
    names = {f"{p}{s}": gguf_name(k) for s, k in GLOBAL_TENSORS.items()}
    names[ckpt.lm_head_name] = gguf_name("OUTPUT")
    return names


def gguf_sources(name: str, global_map: dict[str, str]) -> list[str]:
    """The GGUF tensor(s) the HF tensor `name` is rebuilt from (gate and up for fused experts)."""
    if name in global_map:
        return [global_map[name]]
    block, _, suffix = name.partition(".layers.")[2].partition(".")
    bid = int(block)
    if suffix in BLOCK_TENSORS:
        return [gguf_name(BLOCK_TENSORS[suffix], bid)]
    if suffix == "feed_forward.experts.gate_up_proj":
        return [gguf_name("FFN_GATE_EXP", bid), gguf_name("FFN_UP_EXP", bid)]
    if suffix == "feed_forward.experts.down_proj":
        return [gguf_name("FFN_DOWN_EXP", bid)]
    raise UnsupportedModelError(f"no GGUF tensor holds {name}")


def hf_slices(g: GGUFFile, name: str, shape: tuple[int, ...], global_map: dict[str, str]
              ) -> Iterator[tuple[int | None, Any]]:
    """The HF tensor `name` rebuilt from the GGUF, dequantized: whole (index None) or, for routed
    experts, one expert at a time (index e), so memory stays at one expert slice."""

    sources = gguf_sources(name, global_map)
    if is_expert_tensor(name):
        for e in range(shape[0]):
            yield e, hf_expert(g, name, sources, e)
    else:
        yield None, g.load(sources[0])


def is_expert_tensor(name: str) -> bool:
    """A fused routed-expert tensor ([E, ...]), which GGUF holds per expert in other layouts."""
    return name.endswith(("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"))


def hf_expert(g: GGUFFile, name: str, sources: list[str], e: int) -> Any:
    """Expert `e` of the fused HF expert tensor `name`, from its GGUF `sources` (`gguf_sources`), dequantized:
    gate_up [H, 2I] from gate and up [I, H] each, down [I, H] from [H, I]."""
    import torch

    if name.endswith("gate_up_proj"):
        gate, up = sources
        return torch.cat([g.load(gate, e).T, g.load(up, e).T], dim=1)
    return g.load(sources[0], e).T
