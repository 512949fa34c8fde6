"""int4/int8 ONNX benchmarks (issue 19): bytes on disk and decode speed per dtype, onnxruntime and genai.

1. The wide tiny MoE model of bench_onnx.py (many experts, top-1), exported fp32, fp16, int8 and int4:
   model.onnx.data bytes, decode ms/token (batch 1, KV cache) in onnxruntime driven step by step
   (toolbox.runtime.onnx_decoder) and in onnxruntime-genai's own loop; ratios against fp32.
2. `--memory`: `corral convert --to onnx --dtype int4` of the one-layer Scout-shaped checkpoint
   (bench/work/scout-1layer, read only): wall time, max RSS, bytes written.
3. `--llama-cpp` (its own section): the same wide MoE with the real Llama 4 tokenizer (vocab sized to it),
   exported by corral to ONNX int4 and to a q4_0 GGUF; decode ms/token of onnxruntime, onnxruntime-genai
   and llama.cpp (llama-cpp-python, same threads, same prompt ids, same token count, greedy).
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
    return statistics.median(genai_steps(onnx_dir, prompt, steps))


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


def ort_steps(onnx_dir: Path, prompt: int, steps: int, threads: int) -> list[float]:
    """ms of each decode step in onnxruntime (corral's step driver, KV cache, greedy)."""
    import numpy as np

    from toolbox.runtime.onnx_decoder import OnnxDecoder

    dec = OnnxDecoder(onnx_dir, threads=threads)
    ids = np.arange(3, 3 + prompt, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    logits, cache = dec.run(ids, mask, np.arange(prompt, dtype=np.int64)[None])
    times = []
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        t = time.perf_counter()
        logits, cache = dec.run(nxt, mask, np.array([[prompt + i]]), cache)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def genai_steps(onnx_dir: Path, prompt: int, steps: int) -> list[float]:
    """ms of each generated token in onnxruntime-genai (greedy; the first step, with the prompt, left out)."""
    from toolbox.runtime.genai_decoder import GenaiDecoder

    _, times = GenaiDecoder(onnx_dir).generate_timed(list(range(3, 3 + prompt)), steps + 1,
                                                     min_length=prompt + steps + 1)
    return [t * 1e3 for t in times[1:]]


def llama_cpp_steps(gguf_path: Path, prompt: int, steps: int, threads: int) -> list[float]:
    """ms of each decoded token in llama.cpp (greedy on the returned logits; the prompt step left out)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=prompt + steps + 8, n_batch=prompt, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)
    llm.eval(list(range(3, 3 + prompt)))
    times = []
    for _ in range(steps):  # the last position's logits, read in place (eval keeps none without logits_all)
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        nxt = int(np.argmax(last))
        t = time.perf_counter()
        llm.eval([nxt])
        times.append((time.perf_counter() - t) * 1e3)
    llm.close()
    return times


def llama_cpp_bench(work: Path, quick: bool, threads: int) -> str:
    """ONNX int4 (onnxruntime, genai) vs llama.cpp q4_0, both written by corral from one HF checkpoint."""
    from converters.hf_to_gguf import convert_hf_to_gguf
    from converters.onnx_export import convert_hf_to_onnx
    from toolbox.demo import EOS_IDS, cache_dir
    from toolbox.tokenizer import save_llama4_tokenizer

    hidden, experts, width, layers = (128, 32, 64, 4) if quick else (256, 128, 256, 4)
    prompt, steps, vocab = (8, 8, 202048) if quick else (64, 64, 202048)
    cfg = text_config(hidden, experts, width, layers, vocab, moe=True)
    # the real tokenizer's ids; qk-norm off because llama.cpp's llama4 graph turns it off at 128 experts
    cfg.update(bos_token_id=200000, eos_token_id=EOS_IDS, pad_token_id=200018, use_qk_norm=experts != 128)
    src = work / f"moe-{experts}e-{hidden}-tok"
    shutil.rmtree(src, ignore_errors=True)
    make_random(src, cfg)
    save_llama4_tokenizer(src, cache_dir=cache_dir() / "tokenizer")
    onnx_dir, gguf_path = work / "onnx-int4-tok", work / "moe-tok-q4_0.gguf"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    gguf_path.unlink(missing_ok=True)
    try:
        convert_hf_to_onnx(src, onnx_dir, name="Llama-4-bench-int4", mau_declaration=DECL, dtype="int4")
        convert_hf_to_gguf(src, gguf_path, outtype="q4_0", name="Llama-4-bench-q4_0", mau_declaration=DECL)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        onnx_bytes = (onnx_dir / "model.onnx.data").stat().st_size
        rows = [("llama.cpp q4_0 (llama-cpp-python)", gguf_path.stat().st_size,
                 llama_cpp_steps(gguf_path, prompt, steps, threads)),
                ("onnxruntime int4 (corral's step driver)", onnx_bytes, ort_steps(onnx_dir, prompt, steps, threads)),
                ("onnxruntime-genai int4 (its own loop)", onnx_bytes, genai_steps(onnx_dir, prompt, steps))]
    finally:  # 0.4 GB of checkpoint and both outputs: nothing stays behind
        shutil.rmtree(onnx_dir, ignore_errors=True)
        gguf_path.unlink(missing_ok=True)
        shutil.rmtree(src, ignore_errors=True)
    med = {r: statistics.median(t) for r, _, t in rows}
    best = {r: min(t) for r, _, t in rows}
    base = rows[0][0]
    table = ["| runtime, weights | weights on disk | decode ms/token (median) | vs llama.cpp | fastest step | "
             "vs llama.cpp |", "|---|---|---|---|---|---|"]
    table += [f"| {r} | {b / 2**20:.1f} MiB | {med[r]:.2f} | {med[r] / med[base]:.2f}x | {best[r]:.2f} | "
              f"{best[r] / best[base]:.2f}x |" for r, b, _ in rows]
    return (f"The wide tiny MoE (hidden {hidden}, {layers} layers, {experts} experts of width {width}, top-1 + "
            f"shared expert, qk-norm off as llama.cpp runs 128-expert llama4) with the real Llama 4 tokenizer, so "
            f"vocab {vocab}; exported by corral to ONNX int4 (symmetric blocks of 32; embedding float32, lm_head "
            f"int4) and to GGUF q4_0 (every matrix Q4_0, embedding and output included; norms and router F32). "
            f"Decode: batch 1, CPU, {threads} threads, greedy, median and fastest of {steps} steps after the "
            f"same {prompt}-token prompt (ids 3..{2 + prompt}).\n\n" + "\n".join(table) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    ap.add_argument("--memory", action="store_true", help="also the int4 export of the Scout-shaped layer")
    ap.add_argument("--llama-cpp", action="store_true", help="only the comparison with llama.cpp's q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.llama_cpp:
        marker = "## ONNX int4 vs llama.cpp q4_0, same model (issue 19)"
        text = (f"{marker} — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores (shared "
                f"with other work: loaded)\n\nCommand: `python bench/bench_onnx_quant.py --llama-cpp --write`.\n\n"
                + llama_cpp_bench(a.work, a.quick, a.threads))
        print(text)
        if a.write:
            write_section(marker, text)
        return
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
