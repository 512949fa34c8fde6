"""Meta's original format (issue 18): wall time and max RSS of converting one Scout-shaped original layer.

Writes a synthetic checkpoint in Meta's released layout (params.json + consolidated.00/01.pth, model-parallel 2,
so that wqkv, experts, shared expert, embedding and output really are split; bf16 random values) of ONE layer
with Scout's widths (hidden 5120, 40 query / 8 KV heads of 128, routed experts of width 8192, shared expert of
width 8192), then measures `corral convert --to hf` and `--to gguf --outtype q8_0` against `cp -r && sync` of
the same shards in the same run (/usr/bin/time -v: wall and max RSS). Everything written is deleted.

Disk: input plus output must stay under 8 GB here. The HF run has 8 of Scout's 16 experts and a 32,768-row
vocabulary instead of 202,048 (a real-vocabulary embedding and lm_head alone are 4.1 GB in and 4.1 GB out);
the GGUF run keeps the real vocabulary (its tokenizer needs it) with 2 experts. Peak memory does not depend on
the expert count: experts are read one expert slice at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_gguf import run_timed  # noqa: E402
from results import write_section  # noqa: E402

DECL = "below-700m"
MARKER = "## Meta's original format: one Scout-shaped layer (issue 18)"


def params(dim: int, experts: int, vocab: int) -> dict:
    """Scout's params.json fields, one layer (every layer of Scout is MoE)."""
    return {"dim": dim, "n_layers": 1, "n_heads": 40, "n_kv_heads": 8, "vocab_size": vocab, "multiple_of": 2048,
            "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "norm_eps": 1e-5, "rope_theta": 500000.0,
            "use_scaled_rope": True, "nope_layer_interval": 4, "use_qk_norm": True, "attention_chunk_size": 8192,
            "attn_temperature_tuning": True, "floor_scale": 8192.0, "attn_scale": 0.1,
            "moe_args": {"num_experts": experts, "capacity_factor": 1.0, "auto_scale_F": True, "top_k": 1,
                         "interleave_moe_layer_step": 1}}


def rank_tensors(p: dict, width: int, world: int, rank: int) -> dict:
    """One rank's part of every tensor, in the names of Meta's released files (fairscale's splits)."""
    import torch

    g = torch.Generator().manual_seed(rank)
    d, e, v, hd = p["dim"], p["moe_args"]["num_experts"], p["vocab_size"], p["dim"] // p["n_heads"]
    f = width // world

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    ones = torch.ones(d, dtype=torch.bfloat16)
    q, kv = p["n_heads"] * hd // world, p["n_kv_heads"] * hd // world
    pre = "layers.0."
    return {
        "tok_embeddings.weight": rnd(v // world, d), "norm.weight": ones.clone(), "output.weight": rnd(v // world, d),
        pre + "attention.wqkv.weight": rnd(q + 2 * kv, d), pre + "attention.wo.weight": rnd(d, q),
        pre + "attention.wqkv.layer_norm_weight": ones.clone(), pre + "feed_forward.norm.weight": ones.clone(),
        pre + "feed_forward.router_DE": (torch.randn((d, e), generator=torch.Generator().manual_seed(99)) * 0.02
                                         ).to(torch.bfloat16),
        pre + "feed_forward.experts.moe_w_in_eD_F": rnd(e * d, f),
        pre + "feed_forward.experts.moe_w_swiglu_eD_F": rnd(e * d, f),
        pre + "feed_forward.experts.moe_w_out_eF_D": rnd(e * f, d),
        pre + "feed_forward.w_in_shared_FD.weight": rnd(f, d), pre + "feed_forward.w_swiglu_FD.weight": rnd(f, d),
        pre + "feed_forward.w_out_shared_DF.weight": rnd(d, f),
    }


def write_checkpoint(out: Path, p: dict, width: int, world: int) -> int:
    """params.json + consolidated.NN.pth, one rank at a time (bytes written)."""
    import torch

    out.mkdir(parents=True)
    (out / "params.json").write_text(json.dumps(p, indent=2))
    for rank in range(world):
        torch.save(rank_tensors(p, width, world, rank), out / f"consolidated.{rank:02d}.pth")
    return sum(f.stat().st_size for f in out.glob("consolidated.*.pth"))


def corral(*args: str) -> tuple[float, float]:
    env = {**os.environ, "CORRAL_MAU_DECLARATION": DECL}
    return run_timed([sys.executable, "-m", "toolbox.cli.main", "--quiet", "convert", *args], env=env)


Row = tuple[str, float, float]


def case(work: Path, shape: tuple[int, int, int, int], target: str, extra: list[str]) -> tuple[list[Row], str]:
    """One synthetic checkpoint: `cp -r && sync` of its shards, then one corral conversion (all deleted after)."""
    dim, experts, width, vocab = shape
    src, out = work / "meta-scout-layer", work / ("meta-out.gguf" if target == "gguf" else "meta-out")
    shutil.rmtree(src, ignore_errors=True)
    try:
        size = write_checkpoint(src, params(dim, experts, vocab), width, 2)
        subprocess.run(["sync"], check=True)
        cp_wall, cp_rss = run_timed(["sh", "-c", f"cp -r '{src}' '{work / 'meta-copy'}' && sync"])
        shutil.rmtree(work / "meta-copy")
        wall, rss = corral(str(src), "--to", target, *extra, "-o", str(out))
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work / "meta-copy", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
    what = f"{experts} experts, vocab {vocab}, {size / 2**30:.2f} GiB of shards"
    return [(f"`cp -r && sync` of the shards ({what})", cp_wall, cp_rss),
            (f"`corral convert --to {target} {' '.join(extra)}` ({what})", wall, rss)], what


def bench(work: Path, quick: bool) -> str:
    dim, width = (512, 1024) if quick else (5120, 8192)
    hf_rows, hf_what = case(work, (dim, 4 if quick else 8, width, 4096 if quick else 32768), "hf", ["--dtype", "bf16"])
    # a GGUF carries the Llama 4 tokenizer, so it needs the real vocabulary: fewer experts keep it under the cap
    gguf_rows, gguf_what = case(work, (dim, 2, width, 202048), "gguf", ["--outtype", "q8_0"])
    table = ["| run | wall | max RSS | vs cp |", "|---|---|---|---|"]
    for rows in (hf_rows, gguf_rows):
        table += [f"| {r[0]} | {r[1]:.1f} s | {r[2]:.2f} GiB | {r[1] / rows[0][1]:.2f}x |" for r in rows]
    return (f"{MARKER}\n\nCommand: `python bench/bench_meta.py{' --quick' if quick else ''} --write` (2026-12-01; "
            "a 2-core VM shared with seven other engineers' jobs, so times are upper bounds). Source: synthetic "
            f"checkpoints in Meta's released layout (model-parallel 2, bf16) of one Scout-shaped layer: hidden {dim}, "
            f"40/8 heads of 128, routed experts of width {width} + shared expert. To keep input + output under the "
            "8 GB disk cap, the `--to hf` run has 8 of Scout's 16 experts and a 32,768-row vocabulary "
            f"({hf_what}), the `--to gguf` run (which needs the real 202,048-token vocabulary for the tokenizer) "
            f"2 experts ({gguf_what}); peak memory is per expert slice, so the expert count does not change it. "
            "Shards are read with torch.load(weights_only=True, mmap=True), their pages dropped once copied."
            "\n\n" + "\n".join(table) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    text = bench(a.work, a.quick)
    print(text)
    if a.write:
        write_section(MARKER, text)


if __name__ == "__main__":
    main()
