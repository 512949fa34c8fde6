"""An export-friendly Llama 4 vision encoder + projector, equal to transformers' in the maths.

Why not export transformers' Llama4VisionModel itself: its 2-D rotary embedding is computed in
complex numbers (`view_as_complex`), which torch.onnx cannot translate. This module reuses
transformers' own submodules (so the parameters have the checkpoint's names and initializers keep
them: `vision_model.model.layers.0.self_attn.q_proj.weight`, `multi_modal_projector.linear_1.weight`)
and only re-states the forward with real cos/sin of interleaved pairs (the rotation of
transformers' `vision_apply_rotary_emb`), the patch unfold as a reshape (what `nn.Unfold` with
stride = kernel computes), and the pixel shuffle with static sizes.

forward(pixel_values [tiles, C, S, S]) -> image_features [tiles, tokens_per_tile, text_hidden]: what
`Llama4ForConditionalGeneration.get_image_features` followed by `multi_modal_projector` computes,
one row per `<|patch|>` token of the prompt (tiles in order, row-major).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROPE_COS, ROPE_SIN = "vision_rope_cos", "vision_rope_sin"


def vision_rope(vision_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [patches + 1, head_dim / 2] of transformers' own complex frequencies (CLS last)."""
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    freqs = Llama4VisionRotaryEmbedding._compute_freqs_ci(Llama4VisionConfig(**vision_config))
    freqs = freqs.reshape(freqs.shape[0], -1)
    return freqs.real.float().contiguous(), freqs.imag.float().contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) over interleaved pairs, in float32; x [B, L, heads, D]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3).to(x.dtype)


class Llama4VisionForOnnx(nn.Module):
    """Holds transformers' Llama4VisionModel and Llama4MultiModalProjector; forward re-stated for export."""

    def __init__(self, config: dict[str, Any], device: str = "meta") -> None:
        super().__init__()
        from transformers import Llama4Config
        from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

        cfg = Llama4Config(**{k: v for k, v in config.items() if k not in ("architectures",)})
        vc = cfg.vision_config
        self.patch, self.image_size, self.ratio = int(vc.patch_size), int(vc.image_size), float(vc.pixel_shuffle_ratio)
        self.heads = int(vc.num_attention_heads)
        self.head_dim = int(vc.hidden_size) // self.heads
        with torch.device(device):
            self.vision_model = Llama4VisionModel(vc)
            self.multi_modal_projector = Llama4MultiModalProjector(cfg)
        cos, sin = vision_rope(config["vision_config"])
        self.rope_values = {ROPE_COS: cos, ROPE_SIN: sin}  # the real values, for the data file
        self.register_buffer(ROPE_COS, cos.to(device), persistent=False)
        self.register_buffer(ROPE_SIN, sin.to(device), persistent=False)

    def _patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """nn.Unfold(kernel=stride=patch): [B, C, H, W] -> [B, (H/p)(W/p), C*p*p], channel-major within a patch."""
        b, c, h, w = pixel_values.shape
        p = self.patch
        x = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _layer(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        b, n, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, n, self.heads, self.head_dim)
        k = attn.k_proj(h).view(b, n, self.heads, self.head_dim)
        v = attn.v_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin).transpose(1, 2), _rotate(k, cos, sin).transpose(1, 2)
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5, dim=-1)
        out = torch.matmul(w, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        x = x + attn.o_proj(out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' pixel_shuffle with the sizes known at export time (only the tile count is dynamic)."""
        side = self.image_size // self.patch
        ch = x.shape[-1]
        r = self.ratio
        x = x.reshape(-1, side, side, ch)
        x = x.reshape(-1, side, int(side * r), int(ch / r)).permute(0, 2, 1, 3)
        x = x.reshape(-1, int(side * r), int(side * r), int(ch / (r * r))).permute(0, 2, 1, 3)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.patch_embedding.linear(self._patches(pixel_values.to(vm.patch_embedding.linear.weight.dtype)))
        cls = vm.class_embedding.expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([x, cls], dim=1) + vm.positional_embedding_vlm
        x = vm.layernorm_pre(x)
        cos, sin = getattr(self, ROPE_COS), getattr(self, ROPE_SIN)
        for layer in vm.model.layers:
            x = self._layer(layer, x, cos, sin)
        x = vm.layernorm_post(x)[:, :-1, :]
        x = vm.vision_adapter.mlp(self._pixel_shuffle(x))
        return self.multi_modal_projector(x)
