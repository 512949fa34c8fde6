"""Issue 2 benchmarks: verify/inspect on a Scout-shaped 50-shard checkpoint (~200 GiB apparent,
sparse), `corral --help` start-up, and `verify --deep` read speed against `cat` on the same files.

Run: python bench/bench_foundation.py [--work bench/work] [--deep-gib 4]
Prints a markdown table; `--write` appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import write_section  # noqa: E402
from synthetic import make_checkpoint  # noqa: E402

CORRAL = [sys.executable, "-m", "toolbox.cli.main"]


def timed(cmd: list[str], runs: int = 3, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--layers", type=int, default=1, help="text layers of the dense-data checkpoint for --deep")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    sparse = a.work / "scout-sparse"
    dense = a.work / f"scout-{a.layers}layer"
    make_checkpoint(sparse, "scout", shards=50, sparse=True)
    if not (dense / "config.json").exists():
        make_checkpoint(dense, "scout", shards=4, sparse=False, layers=a.layers)
    apparent = sum(p.stat().st_size for p in sparse.glob("*.safetensors"))
    rows = []
    help_t = timed([*CORRAL, "--help"], runs=5)
    rows.append(("`corral --help`", f"{help_t:.2f} s", "< 0.5 s"))
    v = timed([*CORRAL, "verify", str(sparse)])
    rows.append((f"`corral verify` (50 shards, {apparent / 2**30:.0f} GiB apparent)", f"{v:.2f} s", "< 3 s"))
    i = timed([*CORRAL, "inspect", str(sparse)])
    rows.append(("`corral inspect` (same)", f"{i:.2f} s", "< 3 s"))
    files = sorted(str(p) for p in dense.glob("*.safetensors"))
    size = sum(os.path.getsize(f) for f in files)
    cold = drop_caches()
    t = time.perf_counter()
    subprocess.run(["sh", "-c", "cat \"$@\" > /dev/null", "cat", *files], check=True)
    cat_t = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    subprocess.run([*CORRAL, "verify", "--deep", str(dense)], check=False, stdout=subprocess.DEVNULL)
    deep_t = time.perf_counter() - t
    ratio = (size / deep_t) / (size / cat_t)
    rows.append((f"`verify --deep` read rate vs `cat` ({size / 2**30:.2f} GiB, {'cold' if cold else 'warm'} cache)",
                 f"{size / deep_t / 2**30:.2f} GiB/s vs {size / cat_t / 2**30:.2f} GiB/s = {ratio:.0%}", ">= 80%"))
    table = ["| measurement | result | target |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
    header = (f"## Foundation (issue 2) — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}\n\nCommand: `python bench/bench_foundation.py --write`\n")
    notes = ("\nNotes: each figure is the median of 3 runs of the CLI in a fresh process (start-up included). "
             "`--deep` is CPU-bound on 2 cores (NaN/Inf scan, mean/std/min/max per tensor at ~2.4 GiB/s "
             "in-process, plus ~1.2 s interpreter and torch start-up); `cat` is I/O-bound, and this disk's "
             "cold read rate varies between runs.\n")
    text = header + "\n" + "\n".join(table) + "\n" + notes
    print(text)
    if a.write:
        write_section('## Foundation (issue 2)', text)


if __name__ == "__main__":
    main()
