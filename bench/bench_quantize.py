"""Issue 16 benchmark, side by side in one run, on the synthetic Scout-shaped layer (bench/synthetic.py: one
real-shaped MoE layer, 16 experts, the real 202,048-row embedding and lm_head): `corral convert --outtype q4_k_m`
in one pass (ggml's kernels in-process) against the two-step path it replaces (corral's BF16 GGUF, then
llama.cpp's `llama_model_quantize` on it) and against a synced `cp` of the source. Wall time, max RSS, peak
extra disk; the two q4_k_m files are then compared tensor by tensor (types and bytes).

It also measures ggml's per-core kernel rates (bench/gguf_stages.py, process CPU time: valid on a shared
machine) and prints the kernel-time floor of the q4_k_m mix on this machine's cores, beside a
`RATIO q4_k_m: ...` line against the synced cp of the same run (the issue 16 goal: <= 3x).

Run:  python bench/bench_quantize.py [--work bench/work] [--experts N] [--skip-two-step] [--write]
(`--experts N` measures a fraction of the layer's 16 experts, for small machines; `--skip-two-step`
leaves out the BF16 GGUF + llama_model_quantize reference, ~7 minutes here.)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_gguf import GOALS, evict, run_timed, run_timed_cpu  # noqa: E402
from gguf_stages import kernel_floor, load_note, rates_table, stage_rates, type_elements  # noqa: E402
from results import write_section  # noqa: E402
from synthetic import make_checkpoint, make_scaled  # noqa: E402

MARKER = "## GGUF quantization in one pass (issue 16)"
BF16_REF = """
import sys
from converters.hf_to_gguf import convert_hf_to_gguf
convert_hf_to_gguf(sys.argv[1], sys.argv[2], outtype="bf16", mau_declaration="below-700m", name="Llama-4-bench",
                   direct_io=False)  # llama.cpp's quantizer lays its output out at 32 bytes: give it a 32-aligned input
"""
QUANT_REF = """
import sys
from converters.llama_cpp_quant import quantize_file
quantize_file(__import__("pathlib").Path(sys.argv[1]), __import__("pathlib").Path(sys.argv[2]), "q4_k_m")
"""


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors differing in type or bytes) between two GGUF files."""
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    differ = set(ta) ^ set(tb)
    for name in set(ta) & set(tb):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or not np.array_equal(np.asarray(x.data).view(np.uint8),
                                                                 np.asarray(y.data).view(np.uint8)):
            differ.add(name)
    return len(ta), len(differ)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--experts", type=int, default=16, help="routed experts of the layer (16 = the real Scout)")
    ap.add_argument("--skip-two-step", action="store_true", help="only corral's one pass against cp")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    if a.experts == 16:
        src = a.work / "scout-1layer"
        if not (src / "config.json").exists():
            make_checkpoint(src, "scout", shards=4, sparse=False, layers=1)
    else:
        src = make_scaled(a.work / f"scout-1layer-e{a.experts}", "scout", experts=a.experts, layers=1)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = a.work / "out-quantize"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    subprocess.run(["sync"], check=True)
    evict(src)  # both cp and corral read the source from disk
    cp_wall, cp_rss, cp_cpu = run_timed_cpu(["sh", "-c", f"cp -r '{src}' '{out / 'copy'}' && sync"])
    shutil.rmtree(out / "copy")
    subprocess.run(["sync"], check=True)
    one = out / "one-pass-q4_k_m.gguf"
    evict(src)
    wall, rss, cpu = run_timed_cpu([sys.executable, "-m", "toolbox.cli.main", "--quiet", "convert", str(src), "--to",
                                    "gguf", "--outtype", "q4_k_m", "--mau-declaration", "below-700m", "--name",
                                    "Llama-4-bench", "-o", str(one)], env=env)
    one_size = one.stat().st_size
    subprocess.run(["sync"], check=True)
    gib = 2**30
    rows = [
        ("`cp -r && sync` of the source (baseline)", cp_wall, cp_rss, "-"),
        (f"corral convert --outtype q4_k_m (one pass, {cpu:.0f} CPU-s)", wall, rss,
         f"{one_size / gib:.2f} GiB (the output)"),
    ]
    bf16, ref = out / "bf16.gguf", out / "llama-quantize-q4_k_m.gguf"
    compared = ""
    if not a.skip_two_step:
        bf_wall, bf_rss = run_timed([sys.executable, "-c", BF16_REF, str(src), str(bf16)], env=env)
        bf_size = bf16.stat().st_size
        q_wall, q_rss = run_timed([sys.executable, "-c", QUANT_REF, str(bf16), str(ref)], env=env)
        subprocess.run(["sync"], check=True)
        n, differ = same_tensors(one, ref)
        rows += [
            ("corral convert --outtype bf16 (step 1 of 2)", bf_wall, bf_rss, f"{bf_size / gib:.2f} GiB"),
            ("llama_model_quantize bf16 -> q4_k_m (step 2 of 2)", q_wall, q_rss, "+ the output"),
            ("two steps together", bf_wall + q_wall, max(bf_rss, q_rss),
             f"{(bf_size + ref.stat().st_size) / gib:.2f} GiB"),
        ]
        compared = f"\n\nThe one-pass file and llama.cpp's: {n} tensors compared, {differ} differing in type or bytes."
    rates = stage_rates(src, write_dir=out)
    elements = type_elements(src, "q4_k_m")
    floor = kernel_floor(elements, rates, cores=os.cpu_count() or 1) or float("nan")
    mix = ", ".join(f"{n / 1e9:.2f} G {t}" for t, n in sorted(elements.items()) if t != "F32")
    met = "met" if wall / cp_wall <= GOALS["q4_k_m"] else "not met"
    ratio = (f"RATIO q4_k_m: {wall / cp_wall:.2f}x cp ({wall:.1f} s vs cp -r && sync {cp_wall:.1f} s, max RSS "
             f"{rss:.2f} GiB, {cpu:.0f} CPU-s vs cp's {cp_cpu:.1f}; goal <= {GOALS['q4_k_m']}x: {met}; "
             f"kernel floor {floor:.1f} s = {floor / cp_wall:.2f}x cp)")
    table = ["| run | wall | max RSS | vs cp | peak extra disk |", "|---|---|---|---|---|",
             *[f"| {r[0]} | {r[1]:.1f} s | {r[2]:.2f} GiB | {r[1] / cp_wall:.2f}x | {r[3]} |" for r in rows]]
    part = "the real 16 experts" if a.experts == 16 else f"{a.experts} of the 16 experts (a fraction of the layer)"
    text = (f"{MARKER} — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores\n\n"
            f"Command: `python bench/bench_quantize.py{'' if a.experts == 16 else f' --experts {a.experts}'}"
            f"{' --skip-two-step' if a.skip_two_step else ''} --write`. "
            f"Source: one real-shaped Scout MoE layer ({part}) plus the real embedding and lm_head, "
            f"{size / gib:.2f} GiB of bf16. Both paths use both cores (ggml's kernels on row blocks; "
            "llama.cpp with nthread=2).\n\n" + "\n".join(table) + compared +
            f"\n\nKernel floor: the q4_k_m mix holds {mix} elements; at the per-core rates below, ggml's kernels "
            f"alone need {floor:.1f} s on {os.cpu_count()} cores ({floor / cp_wall:.2f}x this run's cp).\n\n"
            f"{rates_table(rates)}\n\n`{ratio}`\n\nMeasured with {load_note()}.\n")
    print(text)
    print(ratio)
    for f in (one, bf16, ref):
        f.unlink(missing_ok=True)
    if a.write:
        write_section(MARKER, text)


if __name__ == "__main__":
    main()
