"""`corral verify --deep` read rate against `cat > /dev/null` of the same shard files (issue 15).

Both read the same bytes from a cold page cache (caches dropped before each run; needs root, else
both run warm and the table says so), alternating, `--runs` times each; the figure is the ratio of
the medians. The checkpoint is the dense synthetic Scout-shaped one bench_foundation.py uses
(`--layers 1`: 8.12 GiB of bf16 in 4 shards); the CLI runs in a fresh process, start-up included.

Run: python bench/bench_deep.py [--work bench/work] [--layers 1] [--runs 3] [--baseline DIR] [--write]
(`--baseline DIR`: also time the CLI of another checkout, e.g. `git archive HEAD | tar -x -C DIR`.)
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

from bench_foundation import drop_caches  # noqa: E402
from results import write_section  # noqa: E402
from synthetic import make_checkpoint  # noqa: E402

CORRAL = [sys.executable, "-m", "toolbox.cli.main"]


def _timed(cmd: list[str], cold: bool, cwd: Path | None = None) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    res = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout whose CLI is timed too")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    a = ap.parse_args()
    dense = a.work / f"scout-{a.layers}layer"
    if not (dense / "config.json").exists():
        make_checkpoint(dense, "scout", shards=4, sparse=False, layers=a.layers)
    files = sorted(str(p) for p in dense.glob("*.safetensors"))
    size = sum(os.path.getsize(f) for f in files)
    cold = drop_caches()
    cat, deep, base = [], [], []
    dense = dense.absolute()
    for _ in range(a.runs):
        cat.append(_timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], cold))
        deep.append(_timed([*CORRAL, "--quiet", "verify", "--deep", str(dense)], cold))
        if a.baseline is not None:  # run from there: the working directory comes first on sys.path
            base.append(_timed([*CORRAL, "--quiet", "verify", "--deep", str(dense)], cold, a.baseline.absolute()))
    cat_t, deep_t = statistics.median(cat), statistics.median(deep)
    gib = size / 2**30
    ratio = cat_t / deep_t
    load = os.getloadavg()[0]
    baseline = ""
    if base:
        base_t = statistics.median(base)
        baseline = (f"| the same before this change (`--baseline`) | {gib / base_t:.2f} GiB/s = {cat_t / base_t:.0%} "
                    "of `cat` | |\n")
    text = (f"## verify --deep vs cat (issue 15) — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}\n\n"
            f"Command: `python bench/bench_deep.py --layers {a.layers} --runs {a.runs}"
            f"{' --baseline DIR' if a.baseline else ''} --write`\n\n"
            "| measurement | result | target |\n|---|---|---|\n"
            f"| `verify --deep` read rate vs `cat` ({gib:.2f} GiB, {'cold' if cold else 'warm'} cache, "
            f"median of {a.runs}) | {gib / deep_t:.2f} GiB/s vs {gib / cat_t:.2f} GiB/s = {ratio:.0%} | >= 80% |\n"
            f"{baseline}\n"
            f"Runs (s): cat {', '.join(f'{t:.2f}' for t in cat)}; deep {', '.join(f'{t:.2f}' for t in deep)}"
            f"{'; before ' + ', '.join(f'{t:.2f}' for t in base) if base else ''}; "
            f"load average {load:.1f} at the end. The CLI's start-up (~1.2 s: interpreter, torch) is included. "
            "Each 8 MiB piece is read and reduced at once by one of cores + 2 single-threaded workers (min/max, "
            "row sums and row norms in bf16, no conversion pass), overlapping the tokenizer checks; `cat` and "
            "corral share a disk and 2 cores with other jobs here, so single runs vary by 3x.\n")
    print(text)
    if a.write:
        write_section("## verify --deep vs cat (issue 15)", text)


if __name__ == "__main__":
    main()
