"""Llama 4 tensor names in GGUF, as data: HF suffix -> gguf-py tensor kind, per block.

Names come from gguf-py's own `TENSOR_NAMES` table, so they track llama.cpp; the mapping of
HF modules to those kinds is ours (tests check it against `gguf.get_tensor_name_map`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolbox.checkpoint import Llama4Checkpoint

# HF name suffix inside a text block -> gguf MODEL_TENSOR attribute name
BLOCK_TENSORS: dict[str, str] = {
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "input_layernorm.weight": "ATTN_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "feed_forward.router.weight": "FFN_GATE_INP",
    "feed_forward.shared_expert.gate_proj.weight": "FFN_GATE_SHEXP",
    "feed_forward.shared_expert.up_proj.weight": "FFN_UP_SHEXP",
    "feed_forward.shared_expert.down_proj.weight": "FFN_DOWN_SHEXP",
    "feed_forward.gate_proj.weight": "FFN_GATE",
    "feed_forward.up_proj.weight": "FFN_UP",
    "feed_forward.down_proj.weight": "FFN_DOWN",
}
GLOBAL_TENSORS: dict[str, str] = {
    "embed_tokens.weight": "TOKEN_EMBD",
    "norm.weight": "OUTPUT_NORM",
}
F32_KINDS = frozenset({"ATTN_NORM", "FFN_NORM", "OUTPUT_NORM", "FFN_GATE_INP", "ROPE_FREQS"})


def gguf_name(kind: str, bid: int | None = None) -> str:
    import gguf

    fmt = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
    return (fmt.format(bid=bid) if bid is not None else fmt) + ".weight"


def text_name_map(ckpt: Llama4Checkpoint) -> dict[str, str]:
    """HF name -> GGUF name for every non-expert text tensor of this checkpoint."""
    p = ckpt.text_prefix
    out = {f"{p}{suffix}": gguf_name(kind) for suffix, kind in GLOBAL_TENSORS.items()}
    if not ckpt.text.tie_embeddings:
        out[ckpt.lm_head_name] = gguf_name("OUTPUT")
    for i in range(ckpt.text.layers):
        for suffix, kind in BLOCK_TENSORS.items():
            out[f"{p}layers.{i}.{suffix}"] = gguf_name(kind, i)
    return out


def kind_of(gguf_tensor_name: str) -> str | None:
    """The MODEL_TENSOR kind name of a GGUF tensor name (blk.N.attn_q.weight -> ATTN_Q)."""
    import gguf

    base = gguf_tensor_name.removesuffix(".weight").removesuffix(".bias")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) >= 3:
        base = "blk.{bid}." + ".".join(parts[2:])
    for kind, fmt in gguf.TENSOR_NAMES.items():
        if fmt == base:
            return kind.name
    return None
