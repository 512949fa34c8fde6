"""Built-in tiny demo checkpoints: real Llama 4 structure and the real Llama 4 tokenizer at
a tiny width, generated locally (no Hub, no token) and cached.

`demo:scout` is Scout-shaped (16 experts, every layer MoE, qk-norm, llama3 rope scaling);
`demo:maverick` is Maverick-shaped (128 experts, MoE every second layer with dense layers
between, no qk-norm). Both have 4 text layers (layer 3 is NoPE) and a small vision tower.
Weights are random but deterministic, generated from the tensor inventory the config
implies and written through corral's own sink.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

from toolbox.errors import OutputExistsError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress

DEMO_PREFIX = "demo:"
DEMO_FORMAT_VERSION = 5  # bump when what a demo contains changes; invalidates the cache
VARIANTS = ("scout", "maverick")
EOS_IDS = [200001, 200007, 200008]


def cache_dir() -> Path:
    """Where generated demos live: $CORRAL_CACHE_DIR, else $XDG_CACHE_HOME/corral, else ~/.cache/corral."""
    env = os.environ.get("CORRAL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corral"


def demo_config(variant: str, text_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The transformers config (as a dict) of a demo checkpoint (`text_overrides`: e.g. a wider model)."""
    if variant not in VARIANTS:
        raise UsageError(f"unknown demo variant {variant!r}", hint=f"use one of: {', '.join(VARIANTS)}")
    from transformers import Llama4Config

    scout = variant == "scout"
    text = {
        "vocab_size": 202048,
        "hidden_size": 64,
        "intermediate_size": 32,
        "intermediate_size_mlp": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 16 if scout else 128,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1 if scout else 2,
        "use_qk_norm": scout,
        "attention_chunk_size": 8192,
        "max_position_embeddings": 10485760 if scout else 1048576,
        "rope_parameters": (
            {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            if scout else {"rope_type": "default", "rope_theta": 500000.0}
        ),
        "bos_token_id": 200000,
        "eos_token_id": EOS_IDS,
        "pad_token_id": 200018,
        "dtype": "bfloat16",
        **(text_overrides or {}),
    }
    vision = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "vision_output_dim": 32, "image_size": 56, "patch_size": 14, "projector_input_dim": 32,
        "projector_output_dim": 32, "pixel_shuffle_ratio": 0.5, "dtype": "bfloat16",
    }
    cfg = Llama4Config(text_config=text, vision_config=vision, architectures=["Llama4ForConditionalGeneration"],
                       dtype="bfloat16")
    out = cfg.to_dict()
    out.pop("transformers_version", None)
    return out


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """A deterministic random tensor whose scale keeps activations O(1) through the network."""
    import torch

    g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith(".bias"):
        return noise * 0.02
    if "norm" in name.split(".")[-2] or name.endswith("layernorm_pre.weight") or name.endswith("layernorm_post.weight"):
        return 1.0 + 0.05 * noise
    if name.endswith("embed_tokens.weight"):
        return noise
    if name.endswith(("class_embedding", "positional_embedding_vlm")):
        return noise * shape[-1] ** -0.5
    fan_in = shape[1] if name.endswith(("gate_up_proj", "down_proj")) and len(shape) == 3 else shape[-1]
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        # sublayer outputs at 0.3x keep the residual stream stable, as in a trained model, so that
        # quantization noise is not amplified chaotically (a random network at gain 1 is near chaos)
        return noise * 0.3 * fan_in**-0.5
    return noise * fan_in**-0.5


def _demo_stamp(variant: str) -> Any:
    """The demo ships the real Llama 4 tokenizer (Llama Materials), so it carries the full Llama 4 stamp
    and passes corral's own audit: a "Llama" name, the Notice, agreement, use policy and a model card
    ("Built with Llama"). The declaration is the one a local fixture that nobody distributes can truthfully
    make; no operations are recorded, so outputs made from a demo start their history at themselves."""
    from license.stamp import BELOW, Stamp

    return Stamp.create(f"Llama-4-{variant.capitalize()}-demo", declaration=BELOW, policy_id="llama4",
                        multimodal=True)


def create_demo(out: str | Path, variant: str = "scout", *, force: bool = False, seed: int = 0,
                text_overrides: dict[str, Any] | None = None, progress: Progress = NULL_PROGRESS) -> Path:
    """Write a demo checkpoint (config, safetensors, tokenizer, generation config) to `out`."""
    import torch

    from license.stamp import write_sidecars
    from toolbox.checkpoint import from_config
    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.sink import SafetensorsWriter
    from toolbox.tokenizer import save_llama4_tokenizer

    config = demo_config(variant, text_overrides)
    ckpt = from_config(config)
    inventory = ckpt.expected_tensors()
    out = Path(out)
    with atomic_directory(out, force=force) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {"bos_token_id": 200000, "eos_token_id": EOS_IDS, "pad_token_id": 200018,
               "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_llama4_tokenizer(staging, cache_dir=cache_dir() / "tokenizer")
        stamp = _demo_stamp(variant)
        write_sidecars(staging, stamp)
        writer = SafetensorsWriter(staging, max_shard_bytes=32 * 1024**2,
                                   metadata={**stamp.safetensors_metadata(), "corral.demo": variant})
        for name, shape in inventory.items():
            writer.add(name, shape, "BF16")
        writer.begin()
        with progress.task(f"demo:{variant}", total=len(inventory)) as task:
            for name, shape in inventory.items():
                writer.write(name, _init_tensor(name, shape, seed).to(torch.bfloat16))
                task.advance()
        writer.finish()
    return out


def resolve_checkpoint(spec: str | Path, *, progress: Progress = NULL_PROGRESS) -> Path:
    """Turn `demo:scout` / `demo:maverick` into a cached directory; other paths pass through."""
    text = str(spec)
    if not text.startswith(DEMO_PREFIX):
        return Path(spec)
    variant = text[len(DEMO_PREFIX):]
    if variant not in VARIANTS:
        raise UsageError(f"unknown demo checkpoint {text!r}", hint="use demo:scout or demo:maverick")
    target = cache_dir() / "demo" / f"{variant}-v{DEMO_FORMAT_VERSION}"
    if not (target / "config.json").is_file():
        with contextlib.suppress(OutputExistsError):  # another process finished it first
            create_demo(target, variant, progress=progress)
    return target
