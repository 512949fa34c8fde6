"""Issue 6 benchmarks, side by side in one run: peak RSS and wall time of `corral merge`.

1. Streaming at real shapes: a synthetic checkpoint with one Maverick-shaped MoE layer (hidden
   5120, experts of width 8192; `--experts 128` is the real count, 21.5 GB gate_up_proj) plus a
   dense layer and the real embedding/lm_head, and a rank-16 adapter on that layer's attention
   and routed experts (written directly in PEFT's current target_parameters layout). Compared
   with `cp -r` + `sync` of the same base (corral fsyncs its output too).
2. Against PEFT's `merge_and_unload` (load in transformers, merge, save_pretrained) and mergekit's
   `model+lora` (which runs that same PEFT merge into its cache, then a passthrough merge) on a
   model small enough for PEFT to load here: Scout-shaped with `--peft-experts` experts.
   mergekit runs when importable (`--mergekit-path DIR` adds DIR to its PYTHONPATH).

Run (heavy: several GB of disk per run; wait until the machine is quiet):
  python bench/bench_merge.py [--work bench/work] [--experts 128] [--peft-experts 4] [--write]
Smoke run of the script itself: --experts 2 --peft-experts 2 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "## LoRA merge (issue 6)"
RANK = 16


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, max RSS GiB) as /usr/bin/time -v reports them."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False, cwd=REPO,
                         env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {res.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    return wall, (int(m.group(1)) / 2**20 if m else float("nan"))


def make_base(out: Path, variant: str, experts: int, vocab: int | None) -> Path:
    """A synthetic checkpoint: one dense + one MoE layer (Maverick) or one MoE layer (Scout), random bf16."""
    return synthetic.make_scaled(out, variant, experts=experts, layers=2 if variant == "maverick" else 1, vocab=vocab)


def make_adapter(out: Path, base: Path, layer: int, rank: int = RANK) -> Path:
    """A rank-`rank` LoRA on one MoE layer's attention and routed experts, in PEFT 0.21's key layout."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    t = cfg["text_config"]
    h, inter, n = t["hidden_size"], t["intermediate_size"], t["num_local_experts"]
    q = t["num_attention_heads"] * t["head_dim"]
    kv = t["num_key_value_heads"] * t["head_dim"]
    g = torch.Generator().manual_seed(0)
    p = f"base_model.model.language_model.model.layers.{layer}."
    tensors: dict[str, torch.Tensor] = {}

    def pair(key: str, a: tuple[int, int], b: tuple[int, int]) -> None:
        tensors[f"{key}.lora_A.weight"] = (torch.randn(a, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(b, generator=g) * 0.01).to(torch.bfloat16)

    for name, out_f, in_f in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
        pair(f"{p}self_attn.{name}", (rank, in_f), (out_f, rank))
    pair(f"{p}feed_forward.experts.base_layer", (rank * n, 2 * inter), (h, rank * n))  # gate_up [E, H, 2I]
    pair(f"{p}feed_forward.experts", (rank * n, h), (inter, rank * n))  # down [E, I, H]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "peft_version": "0.21.2", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "target_parameters": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
              "base_model_name_or_path": str(base), "bias": "none", "use_dora": False, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": [layer], "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def corral_cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "toolbox.cli.main", "--quiet", "merge", str(base), str(adapter), "-o", str(out),
            "--mau-declaration", "below-700m", "--force"]


PEFT_SCRIPT = """
import sys, torch
from transformers import Llama4ForConditionalGeneration
from peft import PeftModel
m = Llama4ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3])
"""


Row = tuple[str, float, float]


def mergekit_env(path: str | None) -> dict[str, str] | None:
    """The environment in which `python -m mergekit.scripts.run_yaml` runs, or None when mergekit is absent."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    probe = subprocess.run([sys.executable, "-c", "import mergekit.scripts.run_yaml"], env=env, capture_output=True,
                           check=False)
    return env if probe.returncode == 0 else None


def run_mergekit(work: Path, base: Path, adapter: Path, env: dict[str, str]) -> Row:
    """mergekit's `model+lora` (PEFT merge_and_unload into its LoRA cache, then a passthrough merge)."""
    cfg = work / "mergekit.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: bfloat16\n")
    out, cache = work / "mergekit-out", work / "mergekit-cache"
    wall, rss = run_timed([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out),
                           "--lora-merge-cache", str(cache), "--lora-merge-dtype", "bfloat16"], env=env)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return ("mergekit `model+lora` (passthrough, no fsync)", wall, rss)


def side_by_side(work: Path, variant: str, experts: int, vocab: int | None, peft: bool,
                 mk_env: dict[str, str] | None = None) -> list[Row]:
    base = make_base(work / f"base-{variant}-{experts}", variant, experts, vocab)
    layer = 1 if variant == "maverick" else 0
    adapter = make_adapter(work / f"adapter-{variant}-{experts}", base, layer)
    rows = []
    dst = work / "cp-out"
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    wall, rss = run_timed(["sh", "-c", f"cp -r '{base}' '{dst}' && sync"])
    rows.append((f"`cp -r` + `sync` of the base ({size_gib(base):.2f} GiB)", wall, rss))
    shutil.rmtree(dst, ignore_errors=True)
    out = work / "merged"
    wall, rss = run_timed(corral_cmd(base, adapter, out))
    rows.append(("corral merge (fsynced)", wall, rss))
    shutil.rmtree(out, ignore_errors=True)
    if peft:
        out = work / "peft-merged"
        wall, rss = run_timed([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)])
        rows.append(("PEFT merge_and_unload + save_pretrained (no fsync)", wall, rss))
        shutil.rmtree(out, ignore_errors=True)
    if mk_env is not None:
        rows.append(run_mergekit(work, base, adapter, mk_env))
    shutil.rmtree(base, ignore_errors=True)
    return rows


def table(title: str, rows: list[Row]) -> str:
    cp = rows[0][1]
    lines = [f"{title}", "", "| run | wall | max RSS | vs cp |", "|---|---|---|---|"]
    lines += [f"| {name} | {wall:.1f} s | {rss:.2f} GiB | {wall / cp:.2f}x |" for name, wall, rss in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "merge")
    ap.add_argument("--experts", type=int, default=128, help="experts of the Maverick-shaped layer (real: 128)")
    ap.add_argument("--peft-experts", type=int, default=4, help="experts of the Scout-shaped model PEFT loads")
    ap.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary (smoke runs only)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--mergekit-path", default=None, help="a directory to put on PYTHONPATH for mergekit "
                    "(e.g. pip install --no-deps --target DIR mergekit immutables)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stream = side_by_side(a.work, "maverick", a.experts, a.vocab, peft=False)
    parts = [table(f"Maverick-shaped MoE layer with {a.experts} experts (+ a dense layer, embedding, lm_head), "
                   f"rank-{RANK} adapter on its attention and routed experts:", stream)]
    if not a.skip_peft:
        mk_env = mergekit_env(a.mergekit_path)
        vs = side_by_side(a.work, "scout", a.peft_experts, a.vocab, peft=True, mk_env=mk_env)
        parts.append(table(f"Scout-shaped layer with {a.peft_experts} experts, small enough for PEFT to load"
                           f"{'' if mk_env else ' (mergekit not importable, not run)'}:", vs))
    text = (f"{MARKER} — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"Python {platform.python_version()}\n\nCommand: `python bench/bench_merge.py "
            f"--experts {a.experts} --peft-experts {a.peft_experts}"
            f"{f' --vocab {a.vocab}' if a.vocab else ''}{' --skip-peft' if a.skip_peft else ''}"
            f"{' --mergekit-path DIR' if a.mergekit_path else ''} --write`\n\n"
            + "\n\n".join(parts) + "\n")
    print(text)
    if a.write:
        write_section(MARKER, text)


if __name__ == "__main__":
    main()
