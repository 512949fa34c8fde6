"""The real Scout and Maverick configs (public config.json values), for inventory and
parameter-count checks against transformers and for benchmarks with real shapes."""

from __future__ import annotations

import copy
from typing import Any

_VISION = {
    "hidden_size": 1408, "image_size": 336, "intermediate_size": 5632, "num_hidden_layers": 34,
    "num_attention_heads": 16, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
    "projector_output_dim": 4096, "vision_output_dim": 4096, "num_channels": 3, "norm_eps": 1e-5,
    "model_type": "llama4_vision_model",
}
_TEXT = {
    "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "vocab_size": 202048, "num_experts_per_tok": 1, "attention_chunk_size": 8192, "rms_norm_eps": 1e-5,
    "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "tie_word_embeddings": False,
}


def scout_config() -> dict[str, Any]:
    text = {**copy.deepcopy(_TEXT), "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True,
            "max_position_embeddings": 10485760,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "dtype": "bfloat16",
            "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092,
            "text_config": text, "vision_config": copy.deepcopy(_VISION), "tie_word_embeddings": False}


def maverick_config() -> dict[str, Any]:
    cfg = scout_config()
    cfg["text_config"].update({"num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                               "max_position_embeddings": 1048576,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    return cfg
