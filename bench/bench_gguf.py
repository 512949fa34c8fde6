"""Issue 4 benchmarks, side by side in one run, on a synthetic checkpoint with one real-shaped
Scout MoE layer (hidden 5120, 16 experts of width 8192, the real 202,048-row embedding and
lm_head): peak RSS and wall time of `corral convert --to gguf` (bf16 and q8_0) against a plain
`cp` of the same bytes and against llama.cpp's own converter; Q8_0 throughput against
gguf-py's numpy quantizer; per-stage CPU rates (bench/gguf_stages.py), which hold on a shared machine.
Prints one `RATIO <type>: ...` line per type against the synced cp of the same run (the issue 16 goal:
q8_0 <= 1.5x).

llama.cpp's converter is taken from the llama-cpp-python source distribution at bench time
(`pip download --no-binary`), never committed. Run:
  python bench/bench_gguf.py [--work bench/work] [--types bf16,q8_0] [--skip-llama-cpp] [--write]
                             [--against-tree DIR]   (DIR: `git archive COMMIT | tar -x -C DIR`, an A/B)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gguf_stages import load_note, rates_table, stage_rates  # noqa: E402
from results import write_section  # noqa: E402
from synthetic import make_checkpoint  # noqa: E402

GOALS = {"q8_0": 1.5, "q4_k_m": 3.0}  # issue 16: at most this many times a synced cp of the same bytes


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, max RSS GiB) as /usr/bin/time -v reports them."""
    wall, rss, _cpu = run_timed_cpu(cmd, env)
    return wall, rss


def run_timed_cpu(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, max RSS GiB, user + system CPU seconds) as /usr/bin/time -v reports them. On a machine
    shared with other jobs the CPU seconds still say what the run costs: wall >= CPU / cores when idle."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", res.stderr).group(1)) for k in ("User", "System"))
    return wall, rss_kb / 2**20, cpu


def evict(src: Path) -> None:
    """Drop the source's (clean) pages from the page cache, so that cp and corral both read it from disk: the
    unsynced cp before the baseline would otherwise leave it cached for the next run only."""
    for f in src.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def llama_cpp_converter(work: Path) -> Path | None:
    dest = work / "llama.cpp-src"
    script = next(dest.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script is not None:
        return script
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python==0.3.36", "-d", str(dest)], check=True)
    sdist = next(dest.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(dest, filter="data")
    return next(dest.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)


def q8_throughput() -> tuple[float, float]:
    """Elements/s of corral's Q8_0 and of gguf-py's, on the same 64 Mi-element slice."""
    import gguf
    import torch

    from toolbox.tensors.gguf.quant import encode

    x = torch.randn(8192, 8192) * 0.02
    arr = x.numpy()

    def best(fn: object) -> float:
        times = []
        for _ in range(6):  # steady state: the first calls pay for allocator growth and page faults
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return x.numel() / min(times)

    ours = best(lambda: encode(x, "Q8_0"))
    ref = best(lambda: gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0))
    return ours, ref


def against_tree(tree: Path, src: Path, out: Path, outtype: str, wall: float, cpu: float) -> str:
    """The same conversion by another corral tree (an earlier commit), run just after ours on the evicted source:
    on a shared machine two adjacent runs see about the same load, so their CPU seconds compare."""
    evict(src)
    target = out / f"tree-{outtype}.gguf"
    code = (f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'corral'; "
            "runpy.run_module('toolbox.cli.main', run_name='__main__')")
    t_wall, t_rss, t_cpu = run_timed_cpu([sys.executable, "-c", code, "--quiet", "convert", str(src), "--to", "gguf",
                                          "--mau-declaration", "below-700m", "--outtype", outtype, "-o", str(target)])
    target.unlink()
    subprocess.run(["sync"], check=True)
    return (f"RATIO {outtype} vs {tree.name}: CPU {cpu:.1f} / {t_cpu:.1f} s = {cpu / t_cpu:.2f}x, wall {wall:.1f} / "
            f"{t_wall:.1f} s = {wall / t_wall:.2f}x (max RSS {t_rss:.2f} GiB there)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--types", default="bf16,q8_0", help="corral --outtype values to run, comma-separated")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--maverick", action="store_true", help="also the Maverick-shaped layer (~34 GB of disk)")
    ap.add_argument("--against-tree", type=Path, help="another corral source tree (`git archive COMMIT | tar -x -C "
                    "DIR`): its convert runs right after ours on the same evicted source, with a RATIO line")
    a = ap.parse_args()
    if a.maverick:
        maverick(a.work, a.write)
        return
    src = a.work / "scout-1layer"
    if not (src / "config.json").exists():
        make_checkpoint(src, "scout", shards=4, sparse=False, layers=1)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = a.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    plain, _ = run_timed(["cp", "-r", str(src), str(out / "copy0")])
    shutil.rmtree(out / "copy0")
    subprocess.run(["sync"], check=True)
    evict(src)
    # corral fsyncs its output before the atomic rename; the fair baseline is a copy that reaches the disk too
    cp_wall, cp_rss, cp_cpu = run_timed_cpu(["sh", "-c", f"cp -r '{src}' '{out / 'copy'}' && sync"])
    rows.append(("`cp -r` of the checkpoint (returns before the data is on disk)", f"{plain:.1f} s", "-",
                 f"{plain / cp_wall:.2f}x"))
    rows.append(("`cp -r && sync` (baseline)", f"{cp_wall:.1f} s", f"{cp_rss:.2f} GiB", "1.00x"))
    shutil.rmtree(out / "copy")
    subprocess.run(["sync"], check=True)
    corral = [sys.executable, "-m", "toolbox.cli.main", "--quiet", "convert", str(src), "--to", "gguf",
              "--mau-declaration", "below-700m"]
    ratios = []
    for outtype in a.types.split(","):
        evict(src)
        wall, rss, cpu = run_timed_cpu([*corral, "--outtype", outtype, "-o", str(out / f"corral-{outtype}.gguf")])
        rows.append((f"corral convert --outtype {outtype} ({cpu:.1f} CPU-s)", f"{wall:.1f} s", f"{rss:.2f} GiB",
                     f"{wall / cp_wall:.2f}x"))
        goal = f"; goal <= {GOALS[outtype]}x: {'met' if wall / cp_wall <= GOALS[outtype] else 'not met'}" \
            if outtype in GOALS else ""
        ratios.append(f"RATIO {outtype}: {wall / cp_wall:.2f}x cp ({wall:.1f} s vs cp -r && sync {cp_wall:.1f} s, "
                      f"max RSS {rss:.2f} GiB, {cpu:.1f} CPU-s vs cp's {cp_cpu:.1f}{goal})")
        (out / f"corral-{outtype}.gguf").unlink()
        subprocess.run(["sync"], check=True)
        if a.against_tree is not None:
            ratios.append(against_tree(a.against_tree.resolve(), src, out, outtype, wall, cpu))
    if not a.skip_llama_cpp:
        script = llama_cpp_converter(a.work)
        if script is not None:
            env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
            for outtype in ("bf16", "q8_0"):
                wall, rss = run_timed([sys.executable, str(script), str(src), "--outtype", outtype, "--outfile",
                                       str(out / f"llama-{outtype}.gguf")], env=env)
                rows.append((f"llama.cpp convert_hf_to_gguf.py --outtype {outtype} (no fsync)", f"{wall:.1f} s",
                             f"{rss:.2f} GiB", f"{wall / cp_wall:.2f}x"))
                (out / f"llama-{outtype}.gguf").unlink()
    ours, ref = q8_throughput()
    rates = stage_rates(src, write_dir=out)
    table = ["| run | wall | max RSS | vs cp |", "|---|---|---|---|", *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |"
                                                                         for r in rows]]
    text = (f"## HF -> GGUF (issue 4) — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores\n\n"
            f"Command: `python bench/bench_gguf.py --write`. Source: one real-shaped Scout MoE layer plus the real "
            f"embedding and lm_head, {size / 2**30:.2f} GiB of bf16 in 4 shards.\n\n" + "\n".join(table) +
            f"\n\nQ8_0 quantization throughput on one 8192x8192 slice: corral {ours / 1e6:.0f} M elements/s, "
            f"gguf-py numpy {ref / 1e6:.0f} M elements/s ({ours / ref:.1f}x).\n\n"
            f"Per-stage CPU rates (one core, process CPU time, best of a few):\n\n{rates_table(rates)}\n\n"
            + "\n".join(f"`{r}`  " for r in ratios) + f"\n\nMeasured with {load_note()}.\n")
    print(text)
    print("\n".join(ratios))
    if a.write:
        write_section('## HF -> GGUF (issue 4)', text)


def maverick(work: Path, write: bool) -> None:
    """One Maverick-shaped MoE layer (128 experts: a 20 GiB gate_up_proj) to q8_0: peak RSS and time.

    Neither a `cp` of the source nor llama.cpp's converter fits beside it on a 64 GB disk / 24 GiB
    machine (the converter needs ~2x the f32 size of the fused tensor, ~80 GB), so this run reports
    corral alone; its throughput compares with the Scout run above.
    """
    src = work / "maverick-1layer"
    if not (src / "config.json").exists():
        make_checkpoint(src, "maverick", shards=8, sparse=False, layers=2)  # layer 1 MoE, as step 2 implies
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(["sync"], check=True)
    target = out / "maverick-q8_0.gguf"
    wall, rss = run_timed([sys.executable, "-m", "toolbox.cli.main", "--quiet", "convert", str(src), "--to", "gguf",
                           "--outtype", "q8_0", "--mau-declaration", "below-700m", "-o", str(target)])
    written = target.stat().st_size
    target.unlink()
    text = (f"## HF -> GGUF, Maverick-shaped layer (issue 4) — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} cores\n\nCommand: `python bench/bench_gguf.py --maverick --write`. Source: one "
            f"real-shaped Maverick MoE layer (128 experts, gate_up_proj 20 GiB) after a dense layer, with the "
            f"real embedding and lm_head, {size / 2**30:.2f} GiB of bf16 in 8 shards.\n\n"
            "| run | wall | max RSS | read rate |\n|---|---|---|---|\n"
            f"| corral convert --outtype q8_0 ({written / 2**30:.2f} GiB written) | {wall:.1f} s | {rss:.2f} GiB | "
            f"{size / 2**30 / wall:.2f} GiB/s |\n\nNot run beside it: `cp` of the source and llama.cpp's converter "
            "(the disk holds one copy of the source, and the converter needs ~2x the f32 size of the fused "
            "expert tensor, ~80 GB of RAM).\n")
    print(text)
    if write:
        write_section("## HF -> GGUF, Maverick-shaped layer (issue 4)", text)


if __name__ == "__main__":
    main()
