"""Reference helpers for the expert tests: transformers' own Llama 4 model, its routers steered
through a bias (the router is an nn.Linear without one), so transformers' own top-k and sigmoid
do the routing."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "experts", "route", "tokens",
         "through", "layers", "of", "model", "that", "learns", "to", "predict", "next", "word", "in", "code", "and",
         "prose", "alike"]


def calibration_text(path: Path, words: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n", encoding="utf-8")
    return path


def load_reference(path: Path) -> Any:
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def moe_blocks(model: Any) -> dict[int, Any]:
    """{layer index: Llama4TextMoe} of a transformers Llama 4 model."""
    causal = model.language_model if hasattr(model, "language_model") else model  # Llama4ForCausalLM
    layers = causal.model.layers
    return {i: layer.feed_forward for i, layer in enumerate(layers) if layer.is_moe_layer}


def decoder_layers(model: Any) -> Any:
    causal = model.language_model if hasattr(model, "language_model") else model
    return causal.model.layers


def steer_routers(model: Any, bias: dict[int, torch.Tensor]) -> None:
    """Give each MoE layer's router the bias `bias[layer]` (0 = unchanged, -inf = never routed, +inf = forced)."""
    for i, moe in moe_blocks(model).items():
        if i in bias:
            moe.router.bias = torch.nn.Parameter(bias[i].to(torch.float32), requires_grad=False)


def drop_bias(experts: int, kept: list[int]) -> torch.Tensor:
    b = torch.full((experts,), float("-inf"))
    b[kept] = 0.0
    return b


def force_bias(experts: int, e: int) -> torch.Tensor:
    b = torch.full((experts,), float("-inf"))
    b[e] = float("inf")
    return b


def logits(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]


def router_logits(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Per MoE layer, the router logits transformers reports with output_router_logits=True, all tokens."""
    with torch.no_grad():
        outs = [model(input_ids=torch.tensor([s]), output_router_logits=True).router_logits for s in sequences]
    return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
