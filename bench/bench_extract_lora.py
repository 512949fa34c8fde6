"""Issue 22 benchmark: `corral extract-lora` on a Scout-shaped layer, wall time and peak RSS, side by side
with `mergekit-extract-lora` in the same run.

A synthetic base with one Scout-shaped MoE layer (hidden 5120, experts of width 8192, shared expert,
attention 40 x 128 heads) with `--experts` routed experts (16 is Scout's; the default 8 keeps base +
fine-tune under the 8 GB this machine allows a bench) and a small vocabulary (the embedding is not
targeted), and a fine-tune of it: a rank-`--true-rank` delta plus noise on every targeted weight and
expert slice. corral extracts everything at `--rank`; mergekit-extract-lora, which has no routed-expert
support, is given the attention and shared-expert weights only (`--include-regex`), which corral also
runs alone for a like-for-like ratio. Everything written is removed at the end.

Run (heavy: ~6 GB of disk, minutes of CPU; wait until the machine is quiet):
  python bench/bench_extract_lora.py [--work bench/work] [--experts 8] [--rank 16] [--write]
Smoke run of the script itself: --experts 1 --rank 4 (mergekit's part is the same at any --experts)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from bench_merge import run_timed  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "## LoRA extraction (issue 22)"
DENSE = r"layers\.\d+\.(self_attn|feed_forward\.shared_expert)\."


def is_target(name: str) -> bool:
    return "vision" not in name and ".layers." in name and "router" not in name and "norm" not in name


def make_finetune(base: Path, out: Path, true_rank: int, noise: float) -> Path:
    """base + (rank-`true_rank` delta + noise) on every targeted tensor, one safetensors file per tensor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    out.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {}
    for i, (name, shard) in enumerate(sorted(index["weight_map"].items())):
        with safe_open(str(base / shard), "pt") as f:
            t = f.get_tensor(name)
        if is_target(name) and t.dim() >= 2:
            mats = t.view(-1, *t.shape[-2:])
            for m in mats:
                low = torch.randn(m.shape[0], true_rank, generator=g) @ torch.randn(true_rank, m.shape[1], generator=g)
                d = low.mul_(0.02 / true_rank ** 0.5).add_(torch.randn(m.shape, generator=g), alpha=noise)
                m.copy_((m.float() + d).to(m.dtype))
        fname = f"t{i:04d}.safetensors"
        save_file({name: t.contiguous()}, str(out / fname), metadata={"format": "pt"})
        weight_map[name] = fname
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, out / f.name)
    return out


def corral_cmd(ft: Path, base: Path, out: Path, rank: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "toolbox.cli.main", "--json", "--no-progress", "extract-lora", str(ft), "--base",
            str(base), "-o", str(out), "--rank", str(rank), "--mau-declaration", "below-700m", "--force", *extra]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--true-rank", type=int, default=16)
    ap.add_argument("--no-mergekit", action="store_true", help="corral only (mergekit's run does not depend on "
                    "--experts: it is given the same dense parts)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    a = ap.parse_args()
    work = a.work / "extract-lora"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        t0 = time.perf_counter()
        base = synthetic.make_scaled(work / "base", "scout", experts=a.experts, layers=1, vocab=32000)
        ft = make_finetune(base, work / "ft", a.true_rank, noise=2e-4)
        print(f"inputs made in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for label, extra in (("corral, everything (attention, shared expert, routed experts)", ()),
                             ("corral, attention + shared expert", ("--target", "attention", "--target",
                                                                    "shared_expert"))):
            out = work / "lora"
            wall, rss = run_timed(corral_cmd(ft, base, out, a.rank, *extra), env)
            doc = json.loads((out / "adapter_config.json").read_text())
            n = len(doc.get("target_modules") or []) + len(doc.get("target_parameters") or [])
            rows.append((label, wall, rss, n, sum(f.stat().st_size for f in out.iterdir()) / 2**20))
            shutil.rmtree(out)
        mk = None if a.no_mergekit else shutil.which("mergekit-extract-lora")
        if mk:
            out = work / "mk"
            wall, rss = run_timed([mk, "--model", str(ft), "--base-model", str(base), "--out-path", str(out),
                                   "--max-rank", str(a.rank), "-i", DENSE, "--skip-undecomposable",
                                   "--no-copy-tokenizer"], env)
            rows.append(("mergekit-extract-lora, attention + shared expert (no routed-expert support)", wall, rss, 7,
                         sum(f.stat().st_size for f in out.iterdir()) / 2**20))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dense = rows[1][1]
    lines = [MARKER, "",
             f"Machine: 2-core VM shared with other work (loaded during the run), 2026-12-01. Inputs: one Scout-shaped "
             f"MoE layer with {a.experts} routed experts (Scout has 16; fewer to stay within this machine's 8 GB "
             f"bench disk), vocabulary 32000; fine-tune = base + rank-{a.true_rank} delta + noise on every weight "
             f"and expert slice; extraction at rank {a.rank}, f32 factors, `--svd auto` (randomized for these "
             "shapes). Times include start-up and hashing both inputs. Command: "
             f"`python bench/bench_extract_lora.py --experts {a.experts} --rank {a.rank}`.", "",
             "| run | wall s | max RSS GiB | targets | adapter MiB | time vs corral same targets |",
             "|---|---|---|---|---|---|"]
    for label, wall, rss, n, mib in rows:
        ratio = f"{wall / dense:.2f}x" if "shared expert" in label and "everything" not in label else "-"
        lines.append(f"| {label} | {wall:.1f} | {rss:.2f} | {n} | {mib:.0f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        write_section(MARKER, text)


if __name__ == "__main__":
    main()
