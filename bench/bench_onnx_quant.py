"""int4/int8 ONNX benchmarks (issue 19): bytes on disk and decode speed per dtype, onnxruntime and genai.

1. The wide tiny MoE model of bench_onnx.py (many experts, top-1), exported fp32, fp16, int8 and int4:
   model.onnx.data bytes, decode ms/token (batch 1, KV cache) in onnxruntime driven step by step
   (toolbox.runtime.onnx_decoder) and in onnxruntime-genai's own loop; ratios against fp32.
2. `--memory`: `corral convert --to onnx --dtype int4` of the one-layer Scout-shaped checkpoint
   (bench/work/scout-1layer, read only): wall time, max RSS, bytes written.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_gguf import run_timed  # noqa: E402
from bench_onnx import decode_ms, make_random, text_config  # noqa: E402
from results import write_section  # noqa: E402

DECL = "below-700m"
DTYPES = ("fp32", "fp16", "int8", "int4")


def genai_ms(onnx_dir: Path, prompt: int, steps: int) -> float:
    """Median ms per generated token in onnxruntime-genai (greedy; the first step, with the prompt, left out)."""
    from toolbox.runtime.genai_decoder import GenaiDecoder

    dec = GenaiDecoder(onnx_dir)
    _, times = dec.generate_timed(list(range(3, 3 + prompt)), steps + 1, min_length=prompt + steps + 1)
    return statistics.median(times[1:]) * 1e3


def dtype_bench(work: Path, quick: bool, threads: int) -> str:
    from converters.onnx_export import convert_hf_to_onnx

    hidden, experts, width, layers, vocab = (64, 32, 64, 2, 512) if quick else (256, 128, 256, 4, 8192)
    prompt, steps = (8, 8) if quick else (64, 64)
    src = make_random(work / f"moe-{experts}e-{hidden}", text_config(hidden, experts, width, layers, vocab, moe=True))
    rows = []
    for dtype in DTYPES:
        out = work / f"onnx-quant-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        convert_hf_to_onnx(src, out, name=f"Llama-4-bench-{dtype}", mau_declaration=DECL, dtype=dtype)
        export_s = time.perf_counter() - t
        os.environ["OMP_NUM_THREADS"] = str(threads)
        ms, _ = decode_ms(out, prompt, steps, threads)
        g = genai_ms(out, prompt, steps)
        rows.append((dtype, (out / "model.onnx.data").stat().st_size, ms, g, export_s))
        shutil.rmtree(out)
    base_b, base_ms, base_g = rows[0][1], rows[0][2], rows[0][3]
    table = ["| dtype | model.onnx.data | vs fp32 | onnxruntime ms/token | vs fp32 | genai ms/token | vs fp32 | "
             "export s |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {d} | {b / 2**20:.1f} MiB | {b / base_b:.2f}x | {ms:.2f} | {ms / base_ms:.2f}x | {g:.2f} | "
              f"{g / base_g:.2f}x | {e:.0f} |" for d, b, ms, g, e in rows]
    return (f"Wide tiny model: hidden {hidden}, {layers} layers, {experts} experts of width {width} (top-1 + shared "
            f"expert), vocab {vocab}; int8/int4: symmetric blocks of 32, router and embedding float32, lm_head "
            f"quantized. Decode: batch 1, KV cache, CPU, {threads} threads, median of {steps} steps after a "
            f"{prompt}-token prompt.\n\n" + "\n".join(table) + "\n")


def memory_bench(work: Path) -> str:
    src = work / "scout-1layer"
    if not (src / "config.json").exists():
        return "Scout-shaped layer: bench/work/scout-1layer is missing (bench_onnx.py --memory makes it).\n"
    out = work / "onnx-int4-scout-1layer"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "CORRAL_MAU_DECLARATION": DECL}
    wall, rss = run_timed([sys.executable, "-m", "toolbox.cli.main", "--quiet", "convert", str(src), "--to", "onnx",
                           "--dtype", "int4", "-o", str(out)], env=env)
    data = (out / "model.onnx.data").stat().st_size
    shutil.rmtree(out)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return (f"Export of one real-shaped Scout layer to int4 (`corral convert --to onnx --dtype int4`; hidden 5120, "
            f"16 experts of width 8192, real 202,048-row embedding kept float32 and lm_head in int4; "
            f"{size / 2**30:.2f} GiB of bf16 in): {wall:.1f} s wall, max RSS {rss:.2f} GiB, "
            f"{data / 2**30:.2f} GiB written to model.onnx.data.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    ap.add_argument("--memory", action="store_true", help="also the int4 export of the Scout-shaped layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    parts = [dtype_bench(a.work, a.quick, a.threads)]
    if a.memory:
        parts.append(memory_bench(a.work))
    text = (f"## ONNX int4/int8 and onnxruntime-genai (issue 19) — {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: loaded)\n\n"
            f"Command: `python bench/bench_onnx_quant.py --write{' --memory' if a.memory else ''}`.\n\n"
            + "\n".join(parts))
    print(text)
    if a.write:
        write_section("## ONNX int4/int8 and onnxruntime-genai (issue 19)", text)


if __name__ == "__main__":
    main()
