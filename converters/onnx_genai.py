"""genai_config.json: what onnxruntime-genai needs to run a corral ONNX export with its own generation loop.

onnxruntime-genai (`onnxruntime_genai.Model(DIR)`) reads the decoder's I/O names, KV cache shape
(num_key_value_heads x head_size, past sequence on axis 2: corral's [batch, kv_heads, past, head_dim]),
the token ids and the search defaults from this file; its tokenizer reads tokenizer.json and
tokenizer_config.json beside it. Model type "llama": genai's generic decoder-only path, which feeds
input_ids, attention_mask [batch, total_sequence] and position_ids, and grows past/present by
concatenation (past_present_share_buffer false), exactly the export's contract
(converters.onnx_model.io_names). Reference: onnxruntime-genai's config reference
(docs/genai/reference/config.md in microsoft/onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converters.onnx_model import TextDims

GENAI_CONFIG = "genai_config.json"
GENAI_MODEL_TYPE = "llama"
DEFAULT_MAX_LENGTH = 4096  # genai's search.max_length default here: a prompt plus its answer


def _ids(value: Any) -> int | list[int] | None:
    if isinstance(value, list):
        return [int(v) for v in value] if len(value) > 1 else (int(value[0]) if value else None)
    return None if value is None else int(value)


def genai_config(tc: dict[str, Any], generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The genai_config.json document of an export of text config `tc` (generation_config.json's defaults)."""
    d = TextDims.from_text_config(tc)
    gen = generation or {}
    context = int(tc.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    eos = _ids(gen.get("eos_token_id", tc.get("eos_token_id")))
    pad = _ids(gen.get("pad_token_id", tc.get("pad_token_id")))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    model = {
        "type": GENAI_MODEL_TYPE, "context_length": context, "vocab_size": d.vocab,
        "bos_token_id": _ids(gen.get("bos_token_id", tc.get("bos_token_id"))), "eos_token_id": eos,
        "pad_token_id": pad,
        "decoder": {
            "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "head_size": d.head_dim, "hidden_size": d.hidden, "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads, "num_hidden_layers": d.layers,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    search = {"do_sample": bool(gen.get("do_sample", False)), "max_length": min(context, DEFAULT_MAX_LENGTH),
              "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
              "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
              "top_p": float(gen.get("top_p", 1.0)), "early_stopping": True, "length_penalty": 1.0,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def write_genai_config(out_dir: Path, tc: dict[str, Any], src_dir: Path) -> Path:
    """Write genai_config.json into an export directory (the source's generation_config.json for defaults)."""
    gen_file = src_dir / "generation_config.json"
    try:  # a damaged generation_config.json only loses the search defaults (it is copied as is beside)
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    except (ValueError, OSError):
        generation = None
    if not isinstance(generation, dict):
        generation = None
    path = out_dir / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(tc, generation), indent=2) + "\n")
    return path
