"""Issue 16, chains without staging: `corral merge BASE ADAPTER --to gguf` streams the merged tensors into
the converter. Side by side in one run on the Scout-shaped one-layer checkpoint (bench/work/scout-1layer,
read only), with a rank-16 LoRA on its attention and routed experts (bench_merge.make_adapter):

1. streamed merge -> GGUF (`corral merge ... --to gguf --outtype T`)
2. the staged path: `corral merge ... -o HF` (the merged HF copy), then `corral convert HF --to gguf --outtype T`,
   each step measured and the two summed (the HF copy stays on disk while it is converted, as a user's would)
3. the converter alone on the unmerged base (`corral convert BASE --to gguf --outtype T`): what the merge adds

Wall time, CPU seconds (user + system), max RSS (/usr/bin/time -v) and peak extra disk (allocated blocks under
each run's own directory, sampled every 0.2 s) of each; the streamed and staged GGUFs' tensors are compared
byte for byte (sha256 of the data section) and their differing metadata keys listed, then everything the bench
wrote is deleted.

Run: python bench/bench_chain.py [--base bench/work/scout-1layer] [--outtype q8_0] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge import make_adapter  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "## Merge -> GGUF without staging (issue 16)"
DECL = ["--mau-declaration", "below-700m"]


class DiskPeak:
    """The largest allocated size of everything under `root` seen while running."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for p in self.root.rglob("*"):
            with contextlib.suppress(OSError):  # renamed or removed while walking
                total += p.stat().st_blocks * 512 if p.is_file() else 0
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())


@dataclass
class Run:
    label: str
    wall: float  # s
    cpu: float  # user + system s
    rss: float  # GiB
    disk: float  # peak extra GiB
    out: float  # GiB of .gguf under the run's directory at its end


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, user+system CPU s, max RSS GiB) of `cmd` as /usr/bin/time -v reports them."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed: {res.stderr[-3000:]}")

    def field(name: str) -> float:
        m = re.search(rf"{re.escape(name)}: ([\d.]+)", res.stderr)
        return float(m.group(1)) if m else float("nan")

    cpu = field("User time (seconds)") + field("System time (seconds)")
    return wall, cpu, field("Maximum resident set size (kbytes)") / 2**20


def measure(label: str, cmd: list[str], root: Path) -> Run:
    """One command writing under `root`, its peak extra disk counted over everything `root` holds."""
    root.mkdir(parents=True, exist_ok=True)
    with DiskPeak(root) as disk:
        wall, cpu, rss = timed(cmd)
    out = sum(p.stat().st_size for p in root.rglob("*.gguf")) / 2**30
    run = Run(label, wall, cpu, rss, disk.peak / 2**30, out)
    print(f"{label}: {wall:.1f} s, {cpu:.1f} CPU-s, max RSS {rss:.2f} GiB, peak extra disk {run.disk:.2f} GiB "
          f"(output {out:.2f})", flush=True)
    return run


def tensor_digest(path: Path) -> tuple[list[tuple[str, str, tuple[int, ...]]], str]:
    """The tensor table (name, type, shape) and the sha256 of the data section, read in 16 MiB pieces."""
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(path)
    table = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in g.tensors.values()]
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(min(t.data_offset for t in g.tensors.values()))
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return table, h.hexdigest()


def compare(a: Path, b: Path) -> str:
    """What the streamed and staged GGUFs share: their tensors (table and bytes), and the metadata keys that differ
    (the staged conversion's input is the HF copy, so its provenance names that copy as the source)."""
    from toolbox.tensors.gguf.reader import GGUFFile

    same_tensors = tensor_digest(a) == tensor_digest(b)
    fa, fb = GGUFFile(a).fields, GGUFFile(b).fields
    keys = sorted(k for k in set(fa) | set(fb) if str(fa.get(k)) != str(fb.get(k)))
    return (f"tensors {'byte-identical' if same_tensors else 'DIFFERENT'} (table and sha256 of the data); "
            f"metadata keys that differ: {', '.join(keys) or 'none'}")


def bench(base: Path, outtype: str, tmp: Path) -> tuple[list[Run], str]:
    """The streamed chain, the staged path (merge to HF, then convert; summed) and the converter alone."""
    adapter = make_adapter(tmp / "adapter", base, layer=0)
    py = [sys.executable, "-m", "toolbox.cli.main", "--quiet"]
    gguf = ["--to", "gguf", "--outtype", outtype]
    streamed = measure("streamed: merge --to gguf", [*py, "merge", str(base), str(adapter), "-o",
                                                     str(tmp / "streamed" / "m.gguf"), *gguf, *DECL], tmp / "streamed")
    hf = tmp / "staged" / "Llama-4-merged"
    m = measure("staged 1/2: merge -> HF", [*py, "merge", str(base), str(adapter), "-o", str(hf), *DECL],
                tmp / "staged")
    c = measure("staged 2/2: convert HF -> gguf", [*py, "convert", str(hf), *gguf, "-o",
                                                   str(tmp / "staged" / "m.gguf"), *DECL], tmp / "staged")
    staged = Run("staged total (merge -> HF, then convert)", m.wall + c.wall, m.cpu + c.cpu, max(m.rss, c.rss),
                 max(m.disk, c.disk), c.out)
    same = compare(tmp / "streamed" / "m.gguf", tmp / "staged" / "m.gguf")
    shutil.rmtree(tmp / "streamed")
    shutil.rmtree(tmp / "staged")
    alone = measure("convert only (no merge)", [*py, "convert", str(base), *gguf, "-o", str(tmp / "c" / "c.gguf"),
                                                *DECL], tmp / "c")
    shutil.rmtree(tmp / "c")
    return [streamed, m, c, staged, alone], same


def tensor_bytes(base: Path) -> int:
    """The base's tensor bytes, from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n * 2  # bf16
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=HERE / "work" / "scout-1layer")
    ap.add_argument("--outtype", default="q8_0")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    a = ap.parse_args()
    if not (a.base / "config.json").exists():
        sys.exit(f"{a.base} is missing (bench_onnx.py --memory makes bench/work/scout-1layer)")
    base_gib = tensor_bytes(a.base) / 2**30
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-chain-", dir=a.work))
    try:
        rows, same = bench(a.base, a.outtype, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = tuple(max(x, y) for x, y in zip(load, os.getloadavg(), strict=True))
    streamed, staged = rows[0], rows[3]
    verdict = (f"streamed merge -> {a.outtype}: {streamed.wall / staged.wall:.2f}x the staged path's wall time, "
               f"{streamed.cpu / staged.cpu:.2f}x its CPU seconds, peak extra disk {streamed.disk:.2f} GiB vs "
               f"{staged.disk:.2f} GiB ({streamed.disk / streamed.out:.3f}x vs {staged.disk / staged.out:.2f}x the "
               f"output); streamed vs staged GGUF: {same}.")
    lines = [MARKER, "", f"`python bench/bench_chain.py --outtype {a.outtype}` on {a.base.name} "
             f"(Scout-shaped one layer, {base_gib:.2f} GiB bf16) with a rank-16 LoRA on its attention and routed "
             f"experts, all runs in one invocation. Machine: 2-core VM shared with other work, 2026-12-01; load "
             f"average up to {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) while measured: wall times "
             "are upper bounds, CPU seconds depend little on the load.", "",
             "| run | wall s | CPU s | max RSS GiB | peak extra disk GiB | output GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.wall:.1f} | {r.cpu:.1f} | {r.rss:.2f} | {r.disk:.2f} | {r.out:.2f} |" for r in rows]
    lines += ["", verdict, ""]
    print("\n".join(lines))
    if a.write:
        write_section(MARKER, "\n".join(lines))


if __name__ == "__main__":
    main()
