"""The text model's forward pass, one decoder layer at a time: each layer is built by
transformers' own `Llama4TextDecoderLayer` on the meta device and given that layer's tensors
from the TensorSource, then freed. Memory is one layer's weights plus the activations, so
statistics and comparisons work on models larger than RAM, given time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.dtypes import COMPUTE_DTYPES

if TYPE_CHECKING:
    import torch

# called for each MoE layer with (layer index, the layer module, normed FFN input [T, H]) per sequence
MoeHook = Callable[[int, Any, "torch.Tensor"], None]


@dataclass
class StreamedModel:
    """An open checkpoint ready to run layer by layer."""

    path: Path
    source: Any  # TensorSource
    ckpt: Any  # Llama4Checkpoint
    config: Any  # transformers Llama4TextConfig
    dtype: Any  # torch dtype the computation runs in

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.ckpt.text.moe_layers

    def tensor(self, suffix: str) -> torch.Tensor:
        return self.source.load(f"{self.ckpt.text_prefix}{suffix}").to(self.dtype)

    def layer(self, i: int) -> Any:
        """transformers' decoder layer `i` holding this checkpoint's weights (loaded now)."""
        import torch
        from transformers.models.llama4.modeling_llama4 import Llama4TextDecoderLayer

        with torch.device("meta"):
            module = Llama4TextDecoderLayer(self.config, i)
        prefix = f"{self.ckpt.text_prefix}layers.{i}."
        state = {name: self.source.load(prefix + name).to(self.dtype) for name in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
        if module.is_moe_layer:  # transformers runs every expert on every token; run only the routed ones
            module.feed_forward.forward = _sparse_moe(module.feed_forward)
        return module.eval()

    def lm_head(self) -> torch.Tensor:
        ckpt = self.ckpt
        tied = f"{ckpt.text_prefix}embed_tokens.weight"
        name = ckpt.lm_head_name if ckpt.lm_head_name in self.source.infos() else tied
        return self.source.load(name).to(self.dtype)

    def final_hidden(self, sequences: list[list[int]], *, on_moe: MoeHook | None = None,
                     progress: Progress = NULL_PROGRESS, label: str = "layers") -> list[torch.Tensor]:
        """Final-norm hidden states [T, H] of each sequence, computed one layer at a time."""
        import torch
        from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
        from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm, Llama4TextRotaryEmbedding

        cfg = self.config
        top = max((max(s) for s in sequences if s), default=0)
        if top >= cfg.vocab_size:
            from toolbox.errors import BadInputError

            raise BadInputError(f"token id {top} is outside {self.path}'s vocabulary of {cfg.vocab_size}",
                                hint="tokenize with this checkpoint's own tokenizer")
        # only the embedding rows of the tokens present, one row read each (the table is 2 GB in Scout)
        ids = sorted({t for s in sequences for t in s})
        name = f"{self.ckpt.text_prefix}embed_tokens.weight"
        rows = torch.stack([self.source.load_slice(name, i) for i in ids]).to(self.dtype)
        where = {t: k for k, t in enumerate(ids)}
        hidden = [rows[torch.tensor([where[t] for t in s], dtype=torch.long)].unsqueeze(0) for s in sequences]
        del rows
        rotary = Llama4TextRotaryEmbedding(cfg)
        extras = []
        with torch.no_grad():
            for h in hidden:
                pos = torch.arange(h.shape[1]).unsqueeze(0)
                kw = {"config": cfg, "inputs_embeds": h, "attention_mask": None, "past_key_values": None,
                      "position_ids": pos}
                masks = {"full_attention": create_causal_mask(**kw),
                         "chunked_attention": create_chunked_causal_mask(**kw)}
                extras.append((pos, masks, rotary(h, pos)))
            tokens = sum(len(s) for s in sequences)
            captured: list[torch.Tensor] = []
            with progress.task(f"{label}: {tokens} tokens", total=cfg.num_hidden_layers, unit="layers") as task:
                for i in range(cfg.num_hidden_layers):
                    layer = self.layer(i)
                    handle = None
                    if on_moe is not None and layer.is_moe_layer:
                        handle = layer.feed_forward.register_forward_hook(
                            lambda _m, args, _o: captured.append(args[0].reshape(-1, args[0].shape[-1])))
                    for n, (pos, masks, freqs) in enumerate(extras):
                        hidden[n] = layer(hidden[n], attention_mask=masks[cfg.layer_types[i]], position_ids=pos,
                                          position_embeddings=freqs)
                        if captured:
                            assert on_moe is not None
                            on_moe(i, layer, captured.pop())
                    if handle is not None:
                        handle.remove()
                    del layer
                    task.advance()
            norm = Llama4TextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(self.dtype)
            norm.weight.copy_(self.tensor("norm.weight"))
            return [norm(h)[0] for h in hidden]


def open_streamed(path: str | Path, *, dtype: str = "float32") -> StreamedModel:
    """Open a checkpoint (dir or demo:*) for layer-streamed forward passes in `dtype`."""
    import torch
    from transformers import Llama4TextConfig

    from toolbox.checkpoint import load_checkpoint
    from toolbox.errors import UsageError
    from toolbox.experts.output import require_hf, text_config
    from toolbox.reference import open_source, resolve_path

    require_hf(path)
    if dtype not in COMPUTE_DTYPES:
        raise UsageError(f"unknown compute dtype {dtype!r}", hint=f"choose {', '.join(COMPUTE_DTYPES)}")
    directory = resolve_path(path)
    ckpt = load_checkpoint(directory)
    tc = {k: v for k, v in text_config(ckpt.config).items() if k not in ("architectures", "transformers_version")}
    cfg = Llama4TextConfig.from_dict(tc)
    cfg._attn_implementation = "sdpa"
    return StreamedModel(directory, open_source(directory), ckpt, cfg, getattr(torch, dtype))


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sparse_moe(moe: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Llama4TextMoe.forward computing each routed expert on its tokens only (same router, same
    input scaling by the score, same sum): E times less work than transformers' dense bmm."""
    import torch

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, moe.hidden_dim)
        scores, logits = moe.router(x)
        out = moe.shared_expert(x)
        experts = moe.experts
        top = torch.topk(logits, moe.top_k, dim=1).indices
        for e in top.unique().tolist():
            rows = (top == e).any(dim=1).nonzero(as_tuple=True)[0]
            xe = x[rows] * scores[rows, e].unsqueeze(1)
            gate, up = (xe @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, rows, (up * experts.act_fn(gate)) @ experts.down_proj[e])
        return out, logits
    return forward
