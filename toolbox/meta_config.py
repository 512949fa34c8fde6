"""The transformers config (text model, `Llama4ForCausalLM`) of a checkpoint in Meta's original format.

Field for field as transformers' own conversion (`convert_llama4_weights_to_hf.py`) and llama_models'
`llama4/args.py` + `model.py` define them: head_dim is dim // n_heads (llama_models' attention), NoPE
layers are every `nope_layer_interval`-th layer, MoE layers every `interleave_moe_layer_step`-th,
`use_scaled_rope` becomes llama3 rope scaling (factor `rope_scaling_factor`, default 16; high-frequency
factor `rope_high_freq_factor`, default 1; low-frequency factor 1 and an original context of 8192, the
constants of llama_models' `apply_scaling`), and widths come from the tensors themselves.

With `vision_args` (and the vision tensors) the config is `Llama4ForConditionalGeneration`'s: the text
config above as `text_config`, and a `vision_config` from llama_models' `VisionArgs` (`vision/embedding.py`,
`vision/encoder.py`): its MLP is `mlp_ratio * dim` wide, its pixel-shuffled adapter input `dim / ratio**2`
(transformers reads both from one `intermediate_size`, so they must agree), the adapter and projector
`output_dim` wide, layer norms at torch's default eps 1e-5 and the 2-D rotary base 10000 (fixed in
llama_models' encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolbox.errors import ConfigError
from toolbox.tensors.source import TensorInfo

SIDECAR_REVISION = 3  # bump when the derived config or tokenizer changes, so cached sidecars are rebuilt
BOS, EOS, PAD = 200000, 200001, 200018  # <|begin_of_text|>, <|end_of_text|>, <|finetune_right_pad|>
BOI, EOI, IMAGE = 200080, 200081, 200092  # <|image_start|>, <|image_end|>, <|image|> (transformers' Llama4Config)


def dense_width(dim: int, params: dict[str, Any]) -> int:
    """llama_models' FeedForward width of a dense layer (TransformerBlock in llama4/model.py)."""
    hidden = int(2 * int(4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
    multiple = int(params.get("multiple_of") or 256)
    return multiple * ((hidden + multiple - 1) // multiple)


def _int_if_whole(x: Any) -> Any:
    """transformers' Llama4TextConfig takes floor_scale as an int; params.json writes it as a float."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _need(params: dict[str, Any], key: str, where: str) -> Any:
    if params.get(key) is None:
        raise ConfigError(f"{where}: {key} missing", hint="Meta's params.json names dim, n_layers, n_heads, "
                          "vocab_size and norm_eps")
    return params[key]


def hf_config_from_params(params: dict[str, Any], infos: dict[str, TensorInfo], where: str) -> dict[str, Any]:
    """config.json for the tensors `infos` (HF names) of the checkpoint whose params.json is `params`."""
    dim = int(_need(params, "dim", where))
    layers = int(_need(params, "n_layers", where))
    heads = int(_need(params, "n_heads", where))
    kv = int(params.get("n_kv_heads") or heads)
    moe = params.get("moe_args") or {}
    experts = int(moe.get("num_experts") or 0)
    step = int(moe.get("interleave_moe_layer_step") or 1) if experts else 0
    gu = next((i for n, i in infos.items() if n.endswith("experts.gate_up_proj")), None)
    dense = next((i for n, i in infos.items() if n.endswith("feed_forward.gate_proj.weight")), None)
    embed = infos.get("model.embed_tokens.weight") or infos.get("language_model.model.embed_tokens.weight")
    interval = params.get("nope_layer_interval")
    tc: dict[str, Any] = {
        "model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"],
        "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": dim // heads,
        "vocab_size": int(embed.shape[0]) if embed else int(_need(params, "vocab_size", where)),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "intermediate_size": gu.shape[2] // 2 if gu else dense_width(dim, params),
        "intermediate_size_mlp": dense.shape[0] if dense else dense_width(dim, params),
        "num_local_experts": experts, "num_experts_per_tok": int(moe.get("top_k") or 1),
        "interleave_moe_layer_step": step,
        "moe_layers": list(range(step - 1, layers, step)) if step else [],
        "no_rope_layers": [int(not interval or (i + 1) % int(interval) != 0) for i in range(layers)],
        "use_qk_norm": bool(params.get("use_qk_norm", False)),
        "attention_chunk_size": params.get("attention_chunk_size"),
        "attn_temperature_tuning": bool(params.get("attn_temperature_tuning", False)),
        "floor_scale": _int_if_whole(params.get("floor_scale", 8192)),
        "attn_scale": float(params.get("attn_scale", 0.1)),
        "max_position_embeddings": 262144,  # transformers' conversion: 256K for the base models
        "tie_word_embeddings": False, "attention_bias": False,
        "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 500000.0))},
    }
    # the Llama 4 tokenizer's ids (transformers' conversion), where the vocabulary holds them
    tc.update({k: v for k, v in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD))
               if v < tc["vocab_size"]})
    if interval:
        tc["no_rope_layer_interval"] = int(interval)
    if params.get("use_scaled_rope"):
        tc["rope_parameters"].update({"rope_type": "llama3",
                                      "factor": float(params.get("rope_scaling_factor") or 16.0),
                                      "high_freq_factor": float(params.get("rope_high_freq_factor") or 1.0),
                                      "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    if tc["attention_chunk_size"] is None:
        tc["cache_implementation"] = "static"  # as transformers' conversion: no chunked layers
    if "multi_modal_projector.linear_1.weight" not in infos:
        return tc
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": {k: v for k, v in tc.items() if k != "architectures"},
            "vision_config": vision_config(params, where), "boi_token_index": BOI, "eoi_token_index": EOI,
            "image_token_index": IMAGE, "tie_word_embeddings": False, "dtype": "bfloat16"}


def vision_config(params: dict[str, Any], where: str) -> dict[str, Any]:
    """transformers' Llama4VisionConfig for llama_models' VisionArgs (`params["vision_args"]`)."""
    va = params.get("vision_args")
    if not isinstance(va, dict):
        raise ConfigError(f"{where}: the shards hold a vision tower but vision_args is missing",
                          hint="Meta's params.json of a multimodal release has a vision_args object")
    dim, ratio = int(_need(va, "dim", where)), float(_need(va, "pixel_shuffle_ratio", where))
    size, patch = va.get("image_size") or {}, va.get("patch_size") or {}
    if not (isinstance(size, dict) and isinstance(patch, dict) and size.get("height") == size.get("width")
            and patch.get("height") == patch.get("width") and size.get("height") and patch.get("height")):
        raise ConfigError(f"{where}: vision_args image_size {size} / patch_size {patch} are not square",
                          hint="transformers' Llama4VisionConfig takes one image and one patch side")
    width = int(float(_need(va, "mlp_ratio", where)) * dim)
    if int(dim // (ratio * ratio)) != width:
        raise ConfigError(f"{where}: vision_args mlp_ratio gives an MLP {width} wide but the pixel-shuffled "
                          f"adapter input is {int(dim // (ratio * ratio))}",
                          hint="transformers' Llama4VisionConfig holds both in one intermediate_size")
    out = int(_need(va, "output_dim", where))
    return {"model_type": "llama4_vision_model", "hidden_size": dim,
            "num_hidden_layers": int(_need(va, "n_layers", where)),
            "num_attention_heads": int(_need(va, "n_heads", where)), "intermediate_size": width,
            "image_size": int(size["height"]), "patch_size": int(patch["height"]), "num_channels": 3,
            "vision_output_dim": out, "projector_input_dim": out, "projector_output_dim": out,
            "pixel_shuffle_ratio": ratio, "norm_eps": 1e-5, "hidden_act": "gelu", "multi_modal_projector_bias": False,
            "vision_feature_select_strategy": "default", "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def sidecar_directory(meta_dir: Path, infos: dict[str, TensorInfo], params: dict[str, Any], cache: Path) -> Path:
    """A small directory beside the cache holding what an HF checkpoint has and Meta's format lacks: config.json
    (derived above) and the Llama 4 tokenizer files (from the llama-models package). Keyed by params.json and
    the shards' names, sizes and times, so a changed checkpoint gets a fresh one; written atomically."""
    import hashlib
    import json

    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.dtypes import TORCH_NAME
    from toolbox.tokenizer import save_llama4_tokenizer

    h = hashlib.sha256(f"corral-meta-sidecar-{SIDECAR_REVISION}\n".encode())
    h.update((meta_dir / "params.json").read_bytes())
    for f in sorted(meta_dir.glob("consolidated*.pth")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = cache / "meta" / h.hexdigest()[:32]
    if (target / "config.json").is_file():
        return target
    config = hf_config_from_params(params, infos, str(meta_dir / "params.json"))
    floats = {i.dtype for i in infos.values()}
    config["dtype"] = TORCH_NAME["F32" if floats == {"F32"} else next(iter(floats)) if len(floats) == 1 else "BF16"]
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            config[sub]["dtype"] = config["dtype"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, force=True) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_llama4_tokenizer(staging, cache_dir=cache)
    return target
