"""Issue 16 benchmark: measured quality of quantized GGUFs, and `corral imatrix` against `llama-imatrix`.

On a wide 8-layer Scout-shaped demo (rows of 256 so every K-/I-quant block fits, dense layers between MoE
layers, tied embedding; the final norm scaled by 0.03, since a random model's next-token distributions
are otherwise nearly one-hot and leave no KL divergence to measure): the importance matrix computed by
`corral imatrix` from the HF checkpoint and by llama.cpp's `llama-imatrix` from the BF16 GGUF (timed
side by side, both on the Llama 4 license text that ships in corral's `license/texts`), then `corral eval`
of q8_0, q6_k, q4_k_m, iq4_xs and q2_k (without and with each imatrix) and corral's built-in dynamic mixes
(scout-dynamic, maverick-dynamic; scout-dynamic-iq2 with each imatrix, since it needs one) against the HF
source on held-out text (the Llama 4 acceptable use policy, also shipped). Everything is written under a temporary
directory and removed at the end (~0.7 GB).

Run:  python bench/bench_quality.py [--ctx 128] [--chunks 8] [--write]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results import write_section  # noqa: E402

MARKER = "## Quantization quality and corral imatrix (issue 16)"
TEXTS = HERE.parent / "license" / "texts" / "llama4"
DECL = "below-700m"


def soften(src: Path, scale: float) -> None:
    """Scale the final norm (the tied head's input) by `scale`, rewriting only its shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = "language_model.model.norm.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(shard, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[name] = tensors[name] * scale
    save_file(tensors, shard, metadata=meta)


def llama_imatrix() -> Path | None:
    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("CORRAL_TOOLS_CACHE") or Path.home() / ".cache" / "corral-tools")
    path = cache / f"llama.cpp-{version}" / "bin" / "llama-imatrix"
    return path if os.access(path, os.X_OK) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from converters.hf_to_gguf import convert_hf_to_gguf
    from license.stamp import LicenseOptions
    from toolbox.convert import ConvertRequest, convert
    from toolbox.demo import create_demo
    from toolbox.experts.imatrix import compute_imatrix
    from toolbox.experts.quality import evaluate_gguf

    calib, heldout = TEXTS / "LICENSE", TEXTS / "USE_POLICY.md"
    work = Path(tempfile.mkdtemp(prefix="corral-quality-"))
    try:
        src = create_demo(work / "wide8", "scout", text_overrides={
            "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 288, "head_dim": 32,
            "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 8,
            "interleave_moe_layer_step": 2, "tie_word_embeddings": True})
        soften(src, 0.03)
        bf16 = work / "bf16.gguf"
        convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-wide8", direct_io=False)
        t = time.perf_counter()
        ours = work / "corral.imatrix.gguf"
        r = compute_imatrix(src, ours, calib, chunk=args.ctx, license_options=LicenseOptions(mau_declaration=DECL))
        t_ours = time.perf_counter() - t
        imatrices = {"corral imatrix": ours}
        t_ref = None
        tool = llama_imatrix()
        if tool is not None:
            ref = work / "llama.imatrix.gguf"
            t = time.perf_counter()
            subprocess.run([str(tool), "-m", str(bf16), "-f", str(calib), "-o", str(ref), "-c", str(args.ctx),
                            "-t", "2", "--no-ppl"], check=True, capture_output=True)
            t_ref = time.perf_counter() - t
            imatrices["llama-imatrix"] = ref
        files: dict[str, Path] = {}
        plan = [(o, None) for o in ("q8_0", "q6_k", "q4_k_m", "iq4_xs", "q2_k")]
        plan += [(o, k) for o in ("q4_k_m", "iq4_xs", "q2_k") for k in imatrices]
        plan += [("scout-dynamic", None), ("maverick-dynamic", None)] + [("scout-dynamic-iq2", k) for k in imatrices]
        for outtype, im in plan:
            label = outtype + (f" + {im}" if im else "")
            files[label] = work / f"{outtype}-{len(files)}.gguf"
            # the CLI's own request: a dynamic mix name expands to its llama.cpp mix and per-tensor types
            convert(ConvertRequest(src, "gguf", files[label], outtype=outtype,
                                   imatrix=imatrices[im] if im else None,
                                   license=LicenseOptions(name="Llama-4-wide8", mau_declaration=DECL)))
        t = time.perf_counter()
        rep = evaluate_gguf(list(files.values()), src, heldout, ctx=args.ctx, chunks=args.chunks)
        t_eval = time.perf_counter() - t
        by_file = {v.file: v for v in rep.variants}
        rows = [f"| {label} | {by_file[str(p)].size_bytes / 2**20:.1f} MiB | {by_file[str(p)].kl_mean:.5f} | "
                f"{by_file[str(p)].kl_p99:.5f} | {by_file[str(p)].top1_agreement:.3f} | "
                f"{by_file[str(p)].perplexity:.0f} |" for label, p in files.items()]
        load = os.getloadavg()[0]
        ratio = f"{t_ours / t_ref:.2f}x llama-imatrix's {t_ref:.1f} s" if t_ref else "llama-imatrix not built"
        text = f"""{MARKER} — 2026-12-01, x86_64, 2 cores

Command: `python bench/bench_quality.py --ctx {args.ctx} --chunks {args.chunks} --write`. Model: a wide 8-layer
Scout-shaped demo (hidden 256, 16 experts, MoE every second layer, tied embedding, final norm x0.03 so that
the random model's distributions are not one-hot). Imatrix on `license/texts/llama4/LICENSE` ({r.chunks} chunks
of {args.ctx}); eval on `license/texts/llama4/USE_POLICY.md`, {rep.tokens} positions, source perplexity
{rep.variants[0].source_perplexity:.0f} (transformers, float32). KL in nats, KL(source || gguf).

| variant | size | KL mean | KL p99 | top-1 | PPL |
|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

`corral imatrix` (HF checkpoint, transformers layer-streamed): {t_ours:.1f} s, {ratio} on the BF16 GGUF
(start-up and tokenizer loading included in both). `corral eval` of {len(files)} files: {t_eval:.1f} s.
Measured on the shared 2-core VM with other engineers' jobs running (load average {load:.1f} at the end),
so the times are inflated. On random weights an imatrix helps only where quantization error is large
(q2_k); at 4+ bits it may not (no outlier channels for it to protect): real checkpoints differ.
"""
        print(text)
        if args.write:
            write_section(MARKER, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
