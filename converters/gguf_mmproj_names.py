"""Llama 4 vision tower + projector names in an mmproj GGUF, as data (HF name <-> GGUF name).

GGUF names come from gguf-py's `TENSOR_NAMES`, so they track llama.cpp. The mapping is ours,
written from what llama.cpp's runtime computes (tools/mtmd: the generic ViT block and the
llama4 graph), not from gguf-py's `TensorNameMap`: that map sends the vision
`post_attention_layernorm` to `attn_post_norm`, so llama.cpp LayerNorms the attention output with
that weight (its bias is never loaded) and runs the MLP after a bare LayerNorm; transformers uses
it as the pre-MLP LayerNorm, which llama.cpp's ViT block calls `ln2`.
"""

from __future__ import annotations

# HF suffix inside `vision_model.model.layers.{j}.` -> gguf MODEL_TENSOR kind (weight and bias alike)
VISION_BLOCK: dict[str, str] = {
    "self_attn.q_proj": "V_ENC_ATTN_Q",
    "self_attn.k_proj": "V_ENC_ATTN_K",
    "self_attn.v_proj": "V_ENC_ATTN_V",
    "self_attn.o_proj": "V_ENC_ATTN_O",
    "input_layernorm": "V_ENC_INPUT_NORM",  # ln1
    "post_attention_layernorm": "V_ENC_POST_ATTN_NORM",  # ln2: the pre-MLP norm (not attn_post_norm)
    "mlp.fc1": "V_ENC_FFN_UP",
    "mlp.fc2": "V_ENC_FFN_DOWN",
}
# HF module outside the blocks -> (gguf kind, block id for "{bid}" names)
VISION_GLOBAL: dict[str, tuple[str, int | None]] = {
    "vision_model.patch_embedding.linear": ("V_ENC_EMBD_PATCH", None),
    "vision_model.positional_embedding_vlm": ("V_ENC_EMBD_POS", None),
    "vision_model.layernorm_pre": ("V_PRE_NORM", None),
    "vision_model.layernorm_post": ("V_POST_NORM", None),
    "vision_model.vision_adapter.mlp.fc1": ("V_MMPROJ_MLP", 1),
    "vision_model.vision_adapter.mlp.fc2": ("V_MMPROJ_MLP", 2),
    "multi_modal_projector.linear_1": ("V_MMPROJ_FC", None),  # llama.cpp's llama4 graph reads mm.model.fc
}
CLASS_EMBEDDING = "vision_model.class_embedding"  # a bare parameter: no .weight in HF or GGUF
BLOCK_PREFIX = "vision_model.model.layers."


def _fmt(kind: str, bid: int | None) -> str:
    import gguf

    fmt = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
    return fmt.format(bid=bid) if bid is not None else fmt


def mmproj_name(hf_name: str) -> str:
    """The mmproj GGUF name of an HF vision/projector tensor name (KeyError if it has none)."""
    if hf_name == CLASS_EMBEDDING:
        return _fmt("V_ENC_EMBD_CLS", None)
    if hf_name == "vision_model.positional_embedding_vlm":
        return _fmt("V_ENC_EMBD_POS", None) + ".weight"  # llama.cpp reads v.position_embd.weight
    module, _, leaf = hf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        raise KeyError(hf_name)
    if module in VISION_GLOBAL:
        kind, bid = VISION_GLOBAL[module]
        return f"{_fmt(kind, bid)}.{leaf}"
    if module.startswith(BLOCK_PREFIX):
        block, _, suffix = module[len(BLOCK_PREFIX):].partition(".")
        if block.isdigit() and suffix in VISION_BLOCK:
            return f"{_fmt(VISION_BLOCK[suffix], int(block))}.{leaf}"
    raise KeyError(hf_name)


def is_vision_name(hf_name: str) -> bool:
    return hf_name.startswith(("vision_model.", "multi_modal_projector."))


def name_map(hf_names: list[str] | tuple[str, ...] | set[str]) -> dict[str, str]:
    """HF name -> mmproj name for every vision/projector name given (KeyError on one we cannot map)."""
    return {n: mmproj_name(n) for n in hf_names if is_vision_name(n)}
