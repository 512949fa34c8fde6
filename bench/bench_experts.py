"""Issue 7 benchmarks: `corral experts prune` and layer-streamed `corral experts stats`.

1. Pruning a Maverick-shaped MoE layer (hidden 5120, experts of width 8192; `--experts 128` is
   the real count, a 21.5 GB gate_up_proj) to half its experts: peak RSS and wall time, against
   `cp -r` + `sync` of exactly the bytes kept (the pruned output itself; corral fsyncs too).
2. Layer-streamed statistics on a Scout-shaped checkpoint of several MoE layers, run under an
   address-space cap (`ulimit -v`) smaller than the checkpoint: peak RSS and tokens per second.

Synthetic checkpoints (bench/synthetic.py) with random bf16 data; `--vocab` shrinks the real
202,048-row embedding and lm_head so that the expert tensors dominate the bytes moved.

Run (heavy: several GB of disk; wait until the machine is quiet):
  python bench/bench_experts.py [--work bench/work/experts] [--experts 128] [--stats-layers 3] [--write]
Smoke run: --experts 2 --stats-layers 1 --stats-experts 2 --tokens 32 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "## Expert pruning and layer-streamed statistics (issue 7)"
Row = tuple[str, float, float]


def run_timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, max RSS GiB, stdout) as /usr/bin/time -v reports them."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed: {res.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    return wall, (int(m.group(1)) / 2**20 if m else float("nan")), res.stdout


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def make(out: Path, variant: str, experts: int, layers: int, vocab: int | None) -> Path:
    return synthetic.make_scaled(out, variant, experts=experts, layers=layers, vocab=vocab)


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "toolbox.cli.main", "--no-progress", *args]


def bench_prune(work: Path, experts: int, vocab: int | None) -> tuple[str, dict[str, Any]]:
    src = make(work / f"maverick-{experts}", "maverick", experts, 2, vocab)  # dense layer 0 + MoE layer 1
    out, cp_out = work / "pruned", work / "cp-of-kept"
    for p in (out, cp_out):
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    keep = f"0-{experts // 2 - 1}"
    wall, rss, _ = run_timed(corral("--quiet", "experts", "prune", str(src), "-o", str(out), "--keep", keep,
                                    "--mau-declaration", "below-700m"))
    kept = size_gib(out)
    subprocess.run(["sync"], check=True)
    cp_wall, cp_rss, _ = run_timed(["sh", "-c", f"cp -r '{out}' '{cp_out}' && sync"])
    rows: list[Row] = [(f"`cp -r` + `sync` of the bytes kept ({kept:.2f} GiB)", cp_wall, cp_rss),
                       (f"corral experts prune {experts} -> {experts // 2} (fsynced)", wall, rss)]
    data = {"source_gib": size_gib(src), "kept_gib": kept, "prune_wall_s": wall, "prune_rss_gib": rss,
            "cp_wall_s": cp_wall, "ratio": wall / cp_wall}
    for p in (out, cp_out, src):
        shutil.rmtree(p, ignore_errors=True)
    lines = [f"Pruning a Maverick-shaped MoE layer with {experts} experts to {experts // 2} (+ a dense layer, "
             f"embedding and lm_head{f' of {vocab} rows' if vocab else ''}; source {data['source_gib']:.2f} GiB):",
             "", "| run | wall | max RSS | vs cp |", "|---|---|---|---|"]
    lines += [f"| {n} | {w:.1f} s | {r:.2f} GiB | {w / cp_wall:.2f}x |" for n, w, r in rows]
    return "\n".join(lines), data


def bench_stats(work: Path, layers: int, experts: int, tokens: int, cap_gib: float | None,
                dtype: str) -> tuple[str, dict[str, Any]]:
    src = make(work / f"scout-l{layers}", "scout", experts, layers, None)  # the real vocabulary: the tokenizer needs it
    model_gib = size_gib(src)
    cap = cap_gib if cap_gib is not None else round(model_gib * 0.75, 1)
    cal = work / "cal.txt"
    words = ["the", "router", "sends", "every", "token", "to", "one", "expert", "and", "the", "shared", "expert",
             "sees", "them", "all"]
    cal.write_text(" ".join(words[i % len(words)] for i in range(tokens * 2)))
    inner = " ".join(corral("--json", "experts", "stats", str(src), "--calibration", str(cal), "--max-tokens",
                            str(tokens), "--dtype", dtype))
    wall, rss, stdout = run_timed(["sh", "-c", f"ulimit -v {int(cap * 2**20)} && {inner}"])
    doc = json.loads(stdout)
    shutil.rmtree(src, ignore_errors=True)
    data = {"model_gib": model_gib, "cap_gib": cap, "tokens": doc["tokens"], "wall_s": wall, "rss_gib": rss,
            "tokens_per_s": doc["tokens"] / wall, "dtype": dtype}
    rate = data["tokens_per_s"]
    text = (f"Layer-streamed `corral experts stats` on a Scout-shaped checkpoint of {layers} MoE layers "
            f"({model_gib:.2f} GiB, {experts} experts each) under `ulimit -v` {cap:.1f} GiB, "
            f"{doc['tokens']} calibration tokens, compute in {dtype}: completed in {wall:.1f} s "
            f"({rate:.1f} tokens/s, including start-up and reading every layer), max RSS {rss:.2f} GiB.")
    return text, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "experts")
    ap.add_argument("--experts", type=int, default=128, help="experts of the Maverick-shaped layer (real: 128)")
    ap.add_argument("--stats-layers", type=int, default=3, help="MoE layers of the Scout-shaped stats model")
    ap.add_argument("--stats-experts", type=int, default=16, help="experts per layer of the stats model (real: 16)")
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens for the stats run")
    ap.add_argument("--cap-gib", type=float, default=None, help="address-space cap (default: 3/4 of the model)")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the stats run")
    ap.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary of the pruning run")
    ap.add_argument("--skip-stats", action="store_true")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    parts, data = [], {}
    if not a.skip_prune:
        text, data["prune"] = bench_prune(a.work, a.experts, a.vocab)
        parts.append(text)
    if not a.skip_stats:
        text, data["stats"] = bench_stats(a.work, a.stats_layers, a.stats_experts, a.tokens, a.cap_gib, a.dtype)
        parts.append(text)
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"
    report = "\n\n".join([MARKER, f"Measured on {machine} with `python bench/bench_experts.py "
                          f"{' '.join(sys.argv[1:])}`.", *parts]) + "\n"
    print(report)
    print(json.dumps(data, indent=2))
    if a.write:
        write_section(MARKER, report)


if __name__ == "__main__":
    main()
