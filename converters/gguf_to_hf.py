"""GGUF (written by corral or llama.cpp) -> HF safetensors checkpoint, streamed.

Experts are re-fused (gate/up) and transposed back, the router and norms are cast back
from F32, `rope_freqs` is dropped, names and config are restored. Config items GGUF cannot
hold come from the config corral stored in the file (`corral.hf_config`) or, for files
written by other tools, from llama.cpp's own defaults. Without the vision tower (which GGUF
keeps in a separate mmproj file) the result is a text-only `Llama4ForCausalLM`.
F32/F16/BF16 round trips are bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.gguf_names import BLOCK_TENSORS, GLOBAL_TENSORS, gguf_name
from toolbox.checkpoint import from_config
from toolbox.errors import UnsupportedModelError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.gguf_file import GGUFFile

PROVENANCE_KEY = "corral.hf_config"
OUT_DTYPES = {"auto": None, "bf16": "BF16", "f32": "F32", "f16": "F16"}


@dataclass
class HFResult:
    path: Path
    tensors: int
    dtype: str


def _text_config_from_kv(g: GGUFFile) -> dict[str, Any]:
    """A Llama 4 text config from GGUF keys plus llama.cpp's hard-coded values."""
    experts = int(g.arch_key("expert_count", 0))
    layers = int(g.arch_key("block_count"))
    step = int(g.arch_key("interleave_moe_layer_step", 1))
    heads = int(g.arch_key("attention.head_count"))
    hidden = int(g.arch_key("embedding_length"))
    tc: dict[str, Any] = {
        "model_type": "llama4_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.arch_key("attention.head_count_kv", heads)),
        "head_dim": int(g.arch_key("attention.key_length", hidden // heads)),
        "intermediate_size": int(g.arch_key("expert_feed_forward_length")),
        "intermediate_size_mlp": int(g.arch_key("feed_forward_length")),
        "num_local_experts": experts,
        "num_experts_per_tok": int(g.arch_key("expert_used_count", 1)),
        "interleave_moe_layer_step": step,
        "max_position_embeddings": int(g.arch_key("context_length", 131072)),
        "rms_norm_eps": float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(g.arch_key("vocab_size", len(g.get("tokenizer.ggml.tokens", [])))),
        "attention_chunk_size": 8192,
        "use_qk_norm": experts != 128,
        "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(g.arch_key("rope.freq_base", 500000.0))},
    }
    for key, gkey in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("pad_token_id",
                                                                       "tokenizer.ggml.padding_token_id")):
        if g.get(gkey) is not None:
            tc[key] = int(g.get(gkey))
    if g.get("tokenizer.ggml.eos_token_id") is not None:
        tc["eos_token_id"] = int(g.get("tokenizer.ggml.eos_token_id"))
    return tc


def hf_config_for(g: GGUFFile) -> dict[str, Any]:
    """The HF config of the text model in this GGUF (text-only Llama4ForCausalLM)."""
    stored = g.get(PROVENANCE_KEY)
    if stored:
        cfg = json.loads(stored)
        tc = dict(cfg.get("text_config") or cfg)
    else:
        tc = _text_config_from_kv(g)
    tc["model_type"] = "llama4_text"
    tc["architectures"] = ["Llama4ForCausalLM"]
    dtype = (json.loads(stored).get("dtype") if stored else None) or tc.get("dtype") or "bfloat16"
    tc["dtype"] = dtype
    return tc


def convert_gguf_to_hf(src: str | Path, out: str | Path, *, dtype: str = "auto", name: str | None = None,
                       mau_declaration: str | None = None, fix_name: bool = False, force: bool = False,
                       progress: Progress = NULL_PROGRESS) -> HFResult:
    """Convert a llama4 GGUF (or split set) back to an HF checkpoint directory, license-stamped."""
    import torch

    from license.stamp import Stamp, write_sidecars
    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.safetensors_format import TORCH_TO_ST
    from toolbox.tensors.sink import SafetensorsWriter

    g = GGUFFile(src)
    if g.architecture != "llama4":
        raise UnsupportedModelError(f"{g.path}: GGUF architecture {g.architecture!r} is not llama4", path=g.path)
    if dtype not in OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, f16 or f32")
    config = hf_config_for(g)
    ckpt = from_config(config)
    stamp = Stamp.create(name or g.get("general.name") or f"Llama-4-{Path(src).stem}", declaration=mau_declaration,
                         fix=fix_name, provenance={"operations": [{"op": "convert", "to": "hf", "from": "gguf"}],
                                                   "source": Path(src).name})
    types = {g.type_name(n) for n in g.tensors if n.endswith(("_exps.weight", "attn_q.weight"))}
    st_dtype = OUT_DTYPES[dtype] or next((t for t in ("F32", "BF16", "F16") if types == {t}), "BF16")
    config["dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[st_dtype]
    torch_dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[st_dtype])
    inventory = ckpt.expected_tensors()
    p = ckpt.text_prefix
    # HF name -> how to make it
    global_map = {f"{p}{s}": gguf_name(k) for s, k in GLOBAL_TENSORS.items()}
    global_map[ckpt.lm_head_name] = gguf_name("OUTPUT")
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
        for name, shape in inventory.items():
            writer.add(name, shape, TORCH_TO_ST[str(torch_dtype).removeprefix("torch.")])
        writer.begin()
        with progress.task("writing (tensors)", total=len(inventory)) as task:
            for name, shape in inventory.items():
                _write_one(g, writer, name, shape, global_map, torch_dtype)
                task.advance()
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        from converters.gguf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(g, staging)
        write_sidecars(staging, stamp)
    return HFResult(Path(out), len(inventory), st_dtype)


def _write_one(g: GGUFFile, writer: Any, name: str, shape: tuple[int, ...], global_map: dict[str, str],
               dtype: Any) -> None:
    if name in global_map:
        writer.write(name, g.load(global_map[name]).to(dtype))
        return
    block, _, suffix = name.partition(".layers.")[2].partition(".")
    bid = int(block)
    if suffix in BLOCK_TENSORS:
        writer.write(name, g.load(gguf_name(BLOCK_TENSORS[suffix], bid)).to(dtype))
    elif suffix == "feed_forward.experts.gate_up_proj":
        gate, up = gguf_name("FFN_GATE_EXP", bid), gguf_name("FFN_UP_EXP", bid)
        for e in range(shape[0]):  # [I, H] each -> [H, 2I]
            import torch

            writer.write(name, torch.cat([g.load(gate, e).T, g.load(up, e).T], dim=1).to(dtype).contiguous())
    elif suffix == "feed_forward.experts.down_proj":
        down = gguf_name("FFN_DOWN_EXP", bid)
        for e in range(shape[0]):  # [H, I] -> [I, H]
            writer.write(name, g.load(down, e).T.to(dtype).contiguous())
    else:
        raise UnsupportedModelError(f"{g.path}: no GGUF tensor for {name}", path=g.path)
