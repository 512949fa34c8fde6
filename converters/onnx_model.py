"""An export-friendly Llama 4 text decoder, equal to transformers' Llama4ForCausalLM in the maths.

Why a twin of the transformers module at all: the stock one does not export (RoPE in complex
numbers, a Cache object instead of tensors) and computes every expert densely. This one takes
the KV cache as plain tensors (past_key_values.N.key/value in, present.N.key/value out), rotates
interleaved pairs with real cos/sin, builds the chunked-causal mask from the 2-D attention mask the
way transformers' masking_utils does (chunks start after the left padding), applies NoPE layers'
temperature tuning from the cache length, and gathers only the routed experts' weights.

Parameter names are Llama4ForCausalLM's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`),
so the exported initializers keep them (torch.onnx with optimize=False) and ONNX -> HF is a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TextDims:
    """What the graph depends on; derived from a Llama 4 text config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_width: int
    dense_width: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]
    chunked_layers: tuple[bool, ...]
    chunk_size: int | None
    qk_norm: bool
    eps: float
    temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    tie_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_text_config(cls, tc: dict[str, Any]) -> TextDims:
        layers = int(tc["num_hidden_layers"])
        heads = int(tc["num_attention_heads"])
        head_dim = int(tc.get("head_dim") or tc["hidden_size"] // heads)
        step = int(tc.get("interleave_moe_layer_step") or 0)
        moe = tc.get("moe_layers")
        if moe is None:
            moe = [i for i in range(layers) if step and (i + 1) % step == 0]
        nope = tc.get("no_rope_layers")
        if not nope:
            interval = int(tc.get("no_rope_layer_interval") or 4)
            nope = [int((i + 1) % interval != 0) for i in range(layers)]
        chunk = tc.get("attention_chunk_size")
        types = tc.get("layer_types") or ["chunked_attention" if (r and chunk) else "full_attention" for r in nope]
        return cls(
            vocab=int(tc["vocab_size"]), hidden=int(tc["hidden_size"]), layers=layers, heads=heads,
            kv_heads=int(tc.get("num_key_value_heads") or heads), head_dim=head_dim,
            experts=int(tc.get("num_local_experts") or 0), top_k=int(tc.get("num_experts_per_tok") or 1),
            expert_width=int(tc["intermediate_size"]), dense_width=int(tc.get("intermediate_size_mlp") or 0),
            moe_layers=tuple(int(i) for i in moe), rope_layers=tuple(bool(r) for r in nope),
            chunked_layers=tuple(t == "chunked_attention" for t in types),
            chunk_size=int(chunk) if chunk else None, qk_norm=bool(tc.get("use_qk_norm", False)),
            eps=float(tc.get("rms_norm_eps", 1e-5)), temperature_tuning=bool(tc.get("attn_temperature_tuning", False)),
            floor_scale=float(tc.get("floor_scale", 8192)), attn_scale=float(tc.get("attn_scale", 0.1)),
            tie_embeddings=bool(tc.get("tie_word_embeddings", False)),
            attention_bias=bool(tc.get("attention_bias", False)),
        )


def rope_inv_freq(tc: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them (llama3 scaling included)."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    keep = {k: v for k, v in tc.items() if k not in ("architectures", "model_type")}
    rotary = Llama4TextRotaryEmbedding(Llama4TextConfig(**keep))
    return rotary.inv_freq.detach().to(torch.float32).clone(), float(rotary.attention_scaling)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.eps) * self.weight


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, d: TextDims) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(d.experts, d.hidden, 2 * d.expert_width))
        self.down_proj = nn.Parameter(torch.zeros(d.experts, d.expert_width, d.hidden))


class Moe(nn.Module):
    """Router (top-k logits, sigmoid scales the expert input) + routed experts + shared expert.

    mode "auto" (the export default) picks per call, in the graph (an ONNX If): when fewer token-expert
    pairs than experts are routed (decoding), it gathers only the routed experts' weights; otherwise
    (prefill) it runs the dense formulation, whose memory is activations only. "sparse" always
    gathers, "dense" always computes every expert (the stock module; for the benchmark)."""

    def __init__(self, d: TextDims, mode: str) -> None:
        super().__init__()
        self.d, self.mode = d, mode
        self.router = nn.Linear(d.hidden, d.experts, bias=False)
        self.experts = Experts(d)
        self.shared_expert = MLP(d.hidden, d.expert_width)

    def _gather(self, h: torch.Tensor, scores: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        d = self.d
        xin = h.unsqueeze(1) * scores.unsqueeze(-1)  # [T, k, H]
        flat = top_i.reshape(-1)  # index_select exports as one Gather: only the routed experts' bytes are read
        gate_up = torch.index_select(self.experts.gate_up_proj, 0, flat).reshape(
            -1, d.top_k, d.hidden, 2 * d.expert_width)  # [T, k, H, 2I]
        gu = torch.matmul(xin.unsqueeze(2), gate_up).squeeze(2)  # [T, k, 2I]
        gate, up = gu[..., : d.expert_width], gu[..., d.expert_width:]
        act = up * nn.functional.silu(gate)
        down = torch.index_select(self.experts.down_proj, 0, flat).reshape(
            -1, d.top_k, d.expert_width, d.hidden)  # [T, k, I, H]
        return torch.matmul(act.unsqueeze(2), down).squeeze(2).sum(dim=1)

    def _dense(self, h: torch.Tensor, logits: torch.Tensor, top_v: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        d = self.d
        full = torch.full_like(logits, float("-inf")).scatter(1, top_i, top_v)
        s = torch.sigmoid(full.float()).to(h.dtype)  # [T, E], 0 for experts not routed
        xin = h.unsqueeze(0) * s.transpose(0, 1).unsqueeze(-1)  # [E, T, H]
        gu = torch.bmm(xin, self.experts.gate_up_proj)
        gate, up = gu[..., : d.expert_width], gu[..., d.expert_width:]
        return torch.bmm(up * nn.functional.silu(gate), self.experts.down_proj).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d
        shape = x.shape
        h = x.reshape(-1, d.hidden)
        logits = self.router(h)
        top_v, top_i = torch.topk(logits.float(), d.top_k, dim=-1)  # exact for fp16/bf16 (ONNX TopK has no bf16)
        scores = torch.sigmoid(top_v).to(h.dtype)  # [T, k]
        top_v = top_v.to(h.dtype)
        if self.mode == "sparse":
            routed = self._gather(h, scores, top_i)
        elif self.mode == "dense":
            routed = self._dense(h, logits, top_v, top_i)
        else:
            routed = torch.cond(h.shape[0] * d.top_k < d.experts,
                                lambda h, lg, sc, tv, ti: self._gather(h, sc, ti),
                                lambda h, lg, sc, tv, ti: self._dense(h, lg, tv, ti),
                                (h, logits, scores, top_v, top_i))
        return (self.shared_expert(h) + routed).reshape(shape)


class Attention(nn.Module):
    def __init__(self, d: TextDims, layer: int) -> None:
        super().__init__()
        self.d, self.layer = d, layer
        self.use_rope = d.rope_layers[layer]
        b = d.attention_bias
        self.q_proj = nn.Linear(d.hidden, d.heads * d.head_dim, bias=b)
        self.k_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=b)
        self.v_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=b)
        self.o_proj = nn.Linear(d.heads * d.head_dim, d.hidden, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor | None, past_v: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.d
        bsz, q_len = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(bsz, q_len, d.heads, d.head_dim)
        k = self.k_proj(x).view(bsz, q_len, d.kv_heads, d.head_dim)
        v = self.v_proj(x).view(bsz, q_len, d.kv_heads, d.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if d.qk_norm:
                q, k = _rms(q, d.eps), _rms(k, d.eps)
        elif d.temperature_tuning:
            past = past_k.shape[2] if past_k is not None else 0
            pos = torch.arange(q_len, device=x.device).float() + past
            scale = torch.log1p(torch.floor((pos + 1.0) / d.floor_scale)) * d.attn_scale + 1.0
            q = (q * scale.view(1, q_len, 1, 1)).to(q.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if past_k is not None and past_v is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        rep = d.heads // d.kv_heads
        kr = k.unsqueeze(2).expand(bsz, d.kv_heads, rep, k.shape[2], d.head_dim).reshape(bsz, d.heads, -1, d.head_dim)
        vr = v.unsqueeze(2).expand(bsz, d.kv_heads, rep, v.shape[2], d.head_dim).reshape(bsz, d.heads, -1, d.head_dim)
        w = torch.matmul(q, kr.transpose(2, 3)) * (d.head_dim ** -0.5) + bias
        w = torch.softmax(w.float(), dim=-1).to(q.dtype)
        out = torch.matmul(w, vr).transpose(1, 2).reshape(bsz, q_len, d.heads * d.head_dim)
        return self.o_proj(out), k, v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32 like transformers."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(3).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, d: TextDims, layer: int, moe: str) -> None:
        super().__init__()
        self.self_attn = Attention(d, layer)
        self.feed_forward: nn.Module = Moe(d, moe) if layer in d.moe_layers else MLP(d.hidden, d.dense_width)
        self.input_layernorm = RMSNorm(d.hidden, d.eps)
        self.post_attention_layernorm = RMSNorm(d.hidden, d.eps)


class TextModel(nn.Module):
    def __init__(self, d: TextDims, moe: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(d.vocab, d.hidden)
        self.layers = nn.ModuleList([DecoderLayer(d, i, moe) for i in range(d.layers)])
        self.norm = RMSNorm(d.hidden, d.eps)


class Llama4TextForOnnx(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, d: TextDims, inv_freq: torch.Tensor, rope_scale: float = 1.0, *, kv_cache: bool = True,
                 moe: str = "auto") -> None:
        super().__init__()
        self.d, self.kv_cache, self.rope_scale = d, kv_cache, rope_scale
        self.model = TextModel(d, moe)
        if not d.tie_embeddings:
            self.lm_head = nn.Linear(d.hidden, d.vocab, bias=False)
        # a buffer, not a parameter: the exporter names its initializer `rope_inv_freq` and the
        # weight streamer fills it from this value (the module itself may live on the meta device)
        self.register_buffer("rope_inv_freq", inv_freq.to(torch.float32).clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.d
        x = self.model.embed_tokens(input_ids)
        q_len = input_ids.shape[1]
        past_len = past[0].shape[2] if past else 0
        kv_len = attention_mask.shape[1]
        freqs = position_ids[..., None].float() * self.rope_inv_freq
        cos, sin = torch.cos(freqs) * self.rope_scale, torch.sin(freqs) * self.rope_scale
        full, chunked = _masks(attention_mask, q_len, past_len, kv_len, d.chunk_size, x.dtype)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if past else (None, None)
            bias = chunked if (d.chunked_layers[i] and chunked is not None) else full
            a, k, v = layer.self_attn(layer.input_layernorm(x), cos, sin, bias, pk, pv)
            x = x + a
            x = x + layer.feed_forward(layer.post_attention_layernorm(x))
            present += [k, v]
        x = self.model.norm(x)
        if d.tie_embeddings:
            logits = torch.matmul(x, self.model.embed_tokens.weight.t()).float()
        else:  # the module, so that an int4/int8 export can swap it (converters.onnx_qops)
            logits = self.lm_head(x).float()
        return (logits, *present) if self.kv_cache else (logits,)


def _masks(attention_mask: torch.Tensor, q_len: int, past_len: Any, kv_len: Any, chunk: int | None,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive masks [B, 1, Q, K]: causal + padding, and the chunked one (chunks counted after left padding)."""
    dev = attention_mask.device
    kv_idx = torch.arange(kv_len, device=dev)
    q_idx = torch.arange(q_len, device=dev) + past_len
    keep = attention_mask.bool()[:, None, :] & (kv_idx[None, None, :] <= q_idx[None, :, None])  # [B, Q, K]
    low = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=dev)
    neg = torch.full((), low, dtype=dtype, device=dev)
    full = torch.where(keep, zero, neg)[:, None]
    if chunk is None:
        return full, None
    left = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # [B, 1] left padding tokens
    kv_chunk = torch.div((kv_idx[None, :] - left).clamp(min=0), chunk, rounding_mode="floor")  # [B, K]
    q_chunk = torch.div((q_idx[None, :] - left).clamp(min=0), chunk, rounding_mode="floor")  # [B, Q]
    same = kv_chunk[:, None, :] == q_chunk[:, :, None]
    return full, torch.where(keep & same, zero, neg)[:, None]


def io_names(layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    """The usual decoder I/O names (onnxruntime-genai / optimum convention)."""
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    if kv_cache:
        for i in range(layers):
            ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def example_inputs(d: TextDims, kv_cache: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Inputs with every dynamic axis > 1 (torch.export specialises sizes 0 and 1)."""
    bsz, q_len, past = 2, 3, 4 if kv_cache else 0
    ids = torch.zeros((bsz, q_len), dtype=torch.int64)
    mask = torch.ones((bsz, past + q_len), dtype=torch.int64)
    pos = torch.arange(past, past + q_len, dtype=torch.int64).unsqueeze(0).expand(bsz, q_len).contiguous()
    cache = [torch.zeros((bsz, d.kv_heads, past, d.head_dim), dtype=dtype) for _ in range(2 * d.layers)] \
        if kv_cache else []
    return (ids, mask, pos, *cache)
