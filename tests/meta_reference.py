"""A tiny checkpoint in Meta's original format, made by Meta's own reference code.

Run as `python tests/meta_reference.py OUT RANK WORLD PORT [tiny|gguf|vision]` once per model-parallel rank (WORLD
processes at once): each builds llama_models' llama4 `Transformer` under fairscale's model-parallel
init (torch.distributed on gloo, 127.0.0.1), fills its parameters with random values (the ones
llama_models keeps whole on every rank, norms and the router, broadcast from rank 0 so that the
ranks hold one model), saves its state dict as `consolidated.RANK.pth` and runs the model on
`TOKENS`; rank 0 writes params.json and the logits (`reference_logits.pt`). The `vision` profile adds
llama_models' vision encoder, pixel-shuffle adapter and projector (`vision_args`); rank 0 also writes the
projected image features of `PIXELS` (`reference_image_features.pt`), computed by those modules.

With WORLD > 1 the shards are saved in the names of Meta's released files (`attention.wqkv`,
`experts.moe_w_in_eD_F`, `w_in_shared_FD`, `mlp.fc1_weight`, ...), checked by loading each back
through llama_models' own load hooks; with WORLD 1 in the module's own names, as its state dict is.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TOKENS = [[1, 17, 300, 42, 7, 511, 99, 250, 3, 64]]
PARAMS: dict[str, Any] = {
    "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
    "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "norm_eps": 1e-5, "rope_theta": 500000.0,
    "use_scaled_rope": True, "rope_scaling_factor": 8.0, "rope_high_freq_factor": 4.0,
    "nope_layer_interval": 4, "use_qk_norm": True, "attention_chunk_size": 4,
    "attn_temperature_tuning": True, "floor_scale": 4.0, "attn_scale": 0.1,
    "moe_args": {"num_experts": 4, "capacity_factor": 1.0, "auto_scale_F": True, "top_k": 1,
                 "interleave_moe_layer_step": 2},
}


# what llama.cpp's llama4 graph can run as transformers does (its chunk size, temperature tuning and vocabulary)
GGUF_PARAMS: dict[str, Any] = {**PARAMS, "vocab_size": 202048, "attention_chunk_size": 8192, "floor_scale": 8192.0}

# llama_models' VisionArgs: a 56 x 56 tile of 14 x 14 patches (4 x 4 grid), 4 heads so that both ranks hold 2,
# mlp_ratio 4 = 1 / pixel_shuffle_ratio**2 as in the released models
VISION_ARGS: dict[str, Any] = {"image_size": {"height": 56, "width": 56}, "patch_size": {"height": 14, "width": 14},
                               "dim": 32, "n_layers": 2, "n_heads": 4, "mlp_ratio": 4.0, "output_dim": 48,
                               "pixel_shuffle_ratio": 0.5}
VISION_PARAMS: dict[str, Any] = {**PARAMS, "vision_args": VISION_ARGS}
# what llama.cpp's llama4 graph runs (see GGUF_PARAMS), with the vision tower
GGUF_VISION_PARAMS: dict[str, Any] = {**GGUF_PARAMS, "vision_args": VISION_ARGS}
PROFILES = {"tiny": PARAMS, "gguf": GGUF_PARAMS, "vision": VISION_PARAMS, "gguf-vision": GGUF_VISION_PARAMS}
# whole on every rank in llama_models (fairscale splits only the parallel linears' weights and column biases)
_REPLICATED = re.compile(r"(norm\.weight|router_DE|ln_\w+\.(weight|bias)|class_embedding|positional_embedding_vlm"
                         r"|attn\.wo\.bias|mlp\.c_proj\.bias)$")
_LAYER_NORM = re.compile(r"(norm|ln_\w+)\.weight$")


def image() -> torch.Tensor:
    """The image every side encodes: one 56 x 56 RGB tile (H x W x 3, uint8), so llama.cpp resizes nothing."""
    return torch.randint(0, 256, (56, 56, 3), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


def pixels() -> torch.Tensor:
    """`image()` as the vision tower's input [1, 3, H, W]: RGB / 255 normalised with mean = std = 0.5
    (Llama 4's image processing, and llama.cpp's for this model)."""
    return (image().permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5


def released_names(sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The module state dict in the names of Meta's released files (what llama_models' load hooks undo)."""
    out: dict[str, torch.Tensor] = {}
    e, d = params["moe_args"]["num_experts"], params["dim"]
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if k.endswith("attention.wq.weight"):
            p = k.removesuffix("wq.weight")
            out[p + "wqkv.weight"] = torch.cat([sd[p + "wq.weight"], sd[p + "wk.weight"], sd[p + "wv.weight"]])
        elif k.endswith(("attention.wk.weight", "attention.wv.weight")):
            continue
        elif k.endswith("attention_norm.weight"):
            out[k.replace("attention_norm.weight", "attention.wqkv.layer_norm_weight")] = v
        elif k.endswith("ffn_norm.weight"):
            moe = f"{k.removesuffix('ffn_norm.weight')}feed_forward.router_DE" in sd
            out[k.replace("ffn_norm.weight", "feed_forward.norm.weight" if moe
                          else "feed_forward.mlp.layer_norm_weight")] = v
        elif ".experts.w" in k:
            name = {"w1": "moe_w_in_eD_F", "w3": "moe_w_swiglu_eD_F", "w2": "moe_w_out_eF_D"}[leaf]
            out[f"{stem}.{name}"] = v.reshape(e * d, -1) if leaf != "w2" else v.reshape(-1, d)
        elif ".shared_expert." in k:
            name = {"w1": "w_in_shared_FD", "w3": "w_swiglu_FD", "w2": "w_out_shared_DF"}[stem.rpartition(".")[2]]
            out[k.split("shared_expert.")[0] + name + ".weight"] = v
        elif k.endswith("feed_forward.w1.weight"):
            p = k.removesuffix("w1.weight")
            out[p + "mlp.fc1_weight"] = torch.cat([v, sd[p + "w3.weight"]])
        elif k.endswith("feed_forward.w3.weight"):
            continue
        elif k.endswith("feed_forward.w2.weight"):
            out[k.replace("w2.weight", "mlp.fc2_weight")] = v
        else:
            out[k] = v
    return out


def main(out: Path, rank: int, world: int, port: int, params: dict[str, Any]) -> None:
    import fairscale.nn.model_parallel.initialize as fs_init

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]  # llama_models puts its KV cache on CUDA
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fs_init.initialize_model_parallel(world)
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.datatypes import TransformerInput
    from llama_models.llama4.model import Transformer

    torch.set_default_dtype(torch.float32)
    args = ModelArgs(**params, max_seq_len=32, max_batch_size=1)
    model = Transformer(args)
    if args.vision_args:
        model.vision_embeddings.vision_encoder.float()  # llama_models builds it in bf16; the test compares f32
    gen = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _LAYER_NORM.search(name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
            if _REPLICATED.search(name):
                torch.distributed.broadcast(p.data, src=0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if world > 1:
        sd = released_names(sd, params)
        check = Transformer(args)
        check.load_state_dict(dict(sd), strict=True)  # Meta's own load hooks read the released names
    torch.save(sd, out / f"consolidated.{rank:02d}.pth")
    logits = model(TransformerInput(tokens=torch.tensor(TOKENS), tokens_position=0)).logits
    if args.vision_args:
        with torch.no_grad():
            emb = model.vision_embeddings
            features = model.vision_projection(emb.vision_adapter(emb.vision_encoder(pixels()[:, None])))
        if rank == 0:
            torch.save(features.float().clone(), out / "reference_image_features.pt")
    if rank == 0:
        (out / "params.json").write_text(json.dumps(params, indent=2))
        torch.save(logits.float().clone(), out / "reference_logits.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_meta_checkpoint(out: Path, world: int, profile: str = "tiny") -> Path:
    """Run this script in `world` processes (one per model-parallel rank) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(out), str(rank), str(world), str(port), profile],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(world)]
    logs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return out


if __name__ == "__main__":
    profile = sys.argv[5] if len(sys.argv) > 5 else "tiny"
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), PROFILES[profile])
