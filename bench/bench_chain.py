"""Issue 16, chains without staging: `corral merge BASE ADAPTER --to gguf` streams the merged tensors into
the converter. Side by side in one run on the Scout-shaped one-layer checkpoint (bench/work/scout-1layer,
read only), with a rank-16 LoRA on its attention and routed experts (bench_merge.make_adapter):

1. streamed merge -> GGUF (`corral merge ... --to gguf --outtype T`)
2. the converter alone on the unmerged base (`corral convert BASE --to gguf --outtype T`): what the merge adds
3. the staged path's disk: the merged HF copy it wrote first (the base's tensor bytes, computed: writing it
   would exceed this bench's 8 GB disk budget) plus the output

Wall time, max RSS (/usr/bin/time -v) and peak extra disk (allocated blocks under the work directory,
sampled every 0.2 s) of each; the outputs are deleted afterwards.

Run: python bench/bench_chain.py [--base bench/work/scout-1layer] [--outtype q8_0] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_merge import make_adapter, run_timed  # noqa: E402
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


def measure(cmd: list[str], root: Path) -> tuple[float, float, float, float]:
    """(wall s, max RSS GiB, peak extra disk GiB, output GiB) of one command writing under `root`."""
    with DiskPeak(root) as disk:
        wall, rss = run_timed(cmd)
    out = sum(p.stat().st_size for p in root.rglob("*.gguf")) / 2**30
    return wall, rss, disk.peak / 2**30, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=HERE / "work" / "scout-1layer")
    ap.add_argument("--outtype", default="q8_0")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    a = ap.parse_args()
    from safetensors import safe_open

    base_bytes = 0
    for f in sorted(a.base.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                base_bytes += n * 2  # bf16
    tmp = Path(tempfile.mkdtemp(prefix="bench-chain-", dir=a.work))
    try:
        adapter = make_adapter(tmp / "adapter", a.base, layer=0)
        py = [sys.executable, "-m", "toolbox.cli.main", "--quiet"]
        rows = []
        for label, cmd in (
            ("streamed merge -> gguf", [*py, "merge", str(a.base), str(adapter), "-o", str(tmp / "out" / "m.gguf"),
                                        "--to", "gguf", "--outtype", a.outtype, *DECL]),
            ("convert only (no merge)", [*py, "convert", str(a.base), "--to", "gguf", "--outtype", a.outtype,
                                         "-o", str(tmp / "out" / "c.gguf"), *DECL]),
        ):
            (tmp / "out").mkdir(exist_ok=True)
            wall, rss, peak, out = measure(cmd, tmp / "out")
            rows.append((label, wall, rss, peak, out))
            shutil.rmtree(tmp / "out")
            print(f"{label}: {wall:.1f} s, max RSS {rss:.2f} GiB, peak extra disk {peak:.2f} GiB (output {out:.2f})",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (_, sw, srss, speak, sout), (_, cw, _, _, _) = rows
    staged_disk = base_bytes / 2**30 + sout
    verdict = (f"streamed merge -> {a.outtype}: {sw / cw:.2f}x the converter alone, max RSS {srss:.2f} GiB, "
               f"peak extra disk {speak:.2f} GiB = {speak / sout:.3f}x the output "
               f"(staged path: {staged_disk:.2f} GiB)")
    lines = [MARKER, "", f"`python bench/bench_chain.py --outtype {a.outtype}` on {a.base.name} "
             f"(Scout-shaped one layer, {base_bytes / 2**30:.2f} GiB bf16) with a rank-16 LoRA on its attention "
             "and routed experts. Machine: 2-core VM shared with other work (loaded while measured), 2026-12-01.",
             "",
             "| run | wall s | max RSS GiB | peak extra disk GiB | output GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |" for r in rows]
    lines += [f"| staged path (merged HF copy + output; computed, not run: over the 8 GB bench budget) | | | "
              f"{staged_disk:.2f} | {sout:.2f} |", "", verdict, ""]
    print("\n".join(lines))
    if a.write:
        write_section(MARKER, "\n".join(lines))


if __name__ == "__main__":
    main()
