"""`corral verify --deep` read rate against `cat > /dev/null` of the same shard files (issue 15: >= 80%).

Fair and as steady as a shared disk allows: before every run the checkpoint's own pages are dropped from the
page cache (posix_fadvise DONTNEED on each shard: no root needed, and other programs' caches, torch's
libraries included, stay as they are), then `cat` and the CLI run alternately, `--runs` times each. The
table gives the ratio of the medians and of the best runs, the load average at each run, the CPU time
the CLI used, and the scan's in-process rate per core (warm cache, thread CPU time: the figure that
does not depend on the disk or, much, on other load) with the ratio it implies on this machine's cores.
The checkpoint is the dense synthetic Scout-shaped one bench_foundation.py uses (`--layers 1`: 8.12 GiB of
bf16 in 4 shards), read only; the CLI runs in a fresh process, start-up included.

Run: python bench/bench_deep.py [--work bench/work] [--layers 1] [--runs 5] [--baseline DIR] [--write]
(`--baseline DIR`: also time the CLI of another checkout, e.g. `git archive HEAD | tar -x -C DIR`.)
The last line is the verdict.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from results import write_section  # noqa: E402
from synthetic import make_checkpoint  # noqa: E402

CORRAL = [sys.executable, "-m", "toolbox.cli.main"]
TARGET = 0.80


def evict(files: list[str]) -> None:
    """Drop these files' clean pages from the page cache (what a first read after boot sees)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], files: list[str], cwd: Path | None = None) -> tuple[float, float, float]:
    """(wall s, CPU s of the child, load average) of one run from a cold checkpoint."""
    evict(files)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, os.getloadavg()[0]


def cpu_rate(files: list[str], nbytes: int = 512 * 1024**2) -> float:
    """GiB per CPU-second of the scan's per-piece work (pread from the page cache + chunk_stats), one thread,
    over the first `nbytes` of the largest shard (warmed first)."""
    import torch

    from toolbox.verify.deep import DEEP_CHUNK_BYTES, chunk_stats

    torch.set_num_threads(1)
    big = max(files, key=os.path.getsize)
    fd = os.open(big, os.O_RDONLY)
    try:
        n = min(nbytes, os.path.getsize(big) - (1 << 20)) // DEEP_CHUNK_BYTES
        slot = torch.empty(DEEP_CHUNK_BYTES, dtype=torch.uint8)
        view = memoryview(slot.numpy())
        best = float("inf")
        for _ in range(3):  # the first pass also warms the cache
            t = time.thread_time()
            for i in range(n):
                os.preadv(fd, [view], (1 << 20) + i * DEEP_CHUNK_BYTES)
                chunk_stats(slot.view(torch.bfloat16))
            best = min(best, time.thread_time() - t)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return n * DEEP_CHUNK_BYTES / 2**30 / best


def _row(name: str, runs: list[tuple[float, float, float]], gib: float, cat_med: float, cat_best: float) -> str:
    med, best = statistics.median(r[0] for r in runs), min(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return (f"| {name} | {gib / med:.2f} GiB/s = {cat_med / med:.0%} | {gib / best:.2f} GiB/s = "
            f"{cat_best / best:.0%} | {cpu:.1f} CPU-s |\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout whose CLI is timed too")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    a = ap.parse_args()
    dense = (a.work / f"scout-{a.layers}layer").absolute()
    if not (dense / "config.json").exists():
        make_checkpoint(dense, "scout", shards=4, sparse=False, layers=a.layers)
    files = sorted(str(p) for p in dense.glob("*.safetensors"))
    gib = sum(os.path.getsize(f) for f in files) / 2**30
    deep_cmd = [*CORRAL, "--quiet", "verify", "--deep", str(dense)]
    cat, deep, base = [], [], []
    for _ in range(a.runs):  # alternating, so a slow spell of the shared disk hits each about equally
        cat.append(timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], files))
        deep.append(timed(deep_cmd, files))
        if a.baseline is not None:  # run from there: the working directory comes first on sys.path
            base.append(timed(deep_cmd, files, a.baseline.absolute()))
    rate, cores = cpu_rate(files), os.cpu_count() or 1
    cat_med, cat_best = statistics.median(r[0] for r in cat), min(r[0] for r in cat)
    ratio_med, ratio_best = cat_med / statistics.median(r[0] for r in deep), cat_best / min(r[0] for r in deep)
    text = (f"## verify --deep vs cat (issue 15) — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{cores} cores, Python {platform.python_version()}\n\n"
            f"Command: `python bench/bench_deep.py --layers {a.layers} --runs {a.runs}"
            f"{' --baseline DIR' if a.baseline else ''} --write` ({gib:.2f} GiB, checkpoint evicted from the page "
            "cache before each run, runs alternating)\n\n"
            "| run | median | best | CPU (median) |\n|---|---|---|---|\n"
            f"| `cat` | {gib / cat_med:.2f} GiB/s | {gib / cat_best:.2f} GiB/s | "
            f"{statistics.median(r[1] for r in cat):.1f} CPU-s |\n"
            + _row("`corral verify --deep`", deep, gib, cat_med, cat_best)
            + (_row("the same before this change (`--baseline`)", base, gib, cat_med, cat_best) if base else "")
            + f"\nRuns (s, load average): cat {', '.join(f'{w:.2f} ({ld:.1f})' for w, _c, ld in cat)}; "
            f"deep {', '.join(f'{w:.2f} ({ld:.1f})' for w, _c, ld in deep)}"
            f"{'; before ' + ', '.join(f'{w:.2f} ({ld:.1f})' for w, _c, ld in base) if base else ''}.\n\n"
            f"In-process scan rate (pread from the page cache + reduction, one thread, thread CPU time): "
            f"{rate:.2f} GiB per CPU-second; on {cores} cores {rate * cores:.1f} GiB/s, "
            f"{rate * cores * cat_med / gib:.1f}x the median `cat` rate: the reduction is "
            f"{'not ' if rate * cores * cat_med / gib >= 1.5 else ''}what limits the scan here.\n")
    load = max(r[2] for r in cat + deep + base)
    busy = (f"; UNRELIABLE: load average up to {load:.1f} on {cores} cores, rerun on a quiet machine"
            if load > cores / 2 else "")
    verdict = (f"VERDICT: {'PASS' if ratio_med >= TARGET else 'FAIL'} — verify --deep reads at {ratio_med:.0%} of "
               f"cat's rate (median of {a.runs}; best against best {ratio_best:.0%}; target {TARGET:.0%}){busy}")
    print(text)
    print(verdict)
    if a.write:
        write_section("## verify --deep vs cat (issue 15)", text + "\n" + verdict + "\n")


if __name__ == "__main__":
    main()
