"""Issue 22 benchmark: a 3-model TIES weight merge (base + two fine-tunes) of Maverick-shaped layers.

Inputs: synthetic checkpoints with one Maverick MoE layer at the real per-expert shapes (hidden 5120,
expert width 8192, `gate_up_proj` [E, 5120, 16384]) with `--experts` routed experts (the real 128 is
21.5 GB per input for gate_up_proj alone: three inputs and an output do not fit this machine's disk
budget, so the default is 4), a vocabulary of `--vocab` rows and random bf16 data (each input its own
seed). Measured in the same run: `cp -r` + `sync` of one input; one read of every input's files
(the page-cache read rate, for the floor); `corral merge --method ties` at density 0.5 (two reads of
every input: one 16-bit histogram pass for the bf16 top-k threshold, then the merge) and at density 1
(one read); `mergekit-yaml` with the same YAML (whole tensors in memory). Wall time, CPU time (user +
system) and max RSS from /usr/bin/time -v. Everything written is removed at the end.

Run (several GB of disk; wait for a quiet machine):
  python bench/bench_merge_weights.py [--work bench/work] [--experts 4] [--vocab 8192] [--write]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "## Weight merge, TIES (issue 22)"


def make_input(out: Path, experts: int, vocab: int, seed: int) -> Path:
    key = f"maverick-e{experts}-v{vocab}-l1"

    def cfg() -> dict:
        c = synthetic.CONFIGS["maverick"]()
        c["text_config"]["num_local_experts"] = experts
        c["text_config"].update(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return c

    synthetic.CONFIGS[key] = cfg
    return synthetic.make_checkpoint(out, key, shards=4, sparse=False, layers=1, seed=seed)


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), max RSS GiB) as /usr/bin/time -v reports them."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False, cwd=REPO,
                         env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {res.stderr[-3000:]}")

    def field(label: str) -> float:
        m = re.search(rf"{label}: ([0-9.]+)", res.stderr)
        return float(m.group(1)) if m else float("nan")

    return wall, field(r"User time \(seconds\)") + field(r"System time \(seconds\)"), \
        field(r"Maximum resident set size \(kbytes\)") / 2**20


def read_all(dirs: list[Path]) -> float:
    """Seconds to read every input's safetensors files once into a reused buffer."""
    buf = memoryview(bytearray(16 << 20))
    t = time.perf_counter()
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t


def hash_all(dirs: list[Path]) -> tuple[float, float]:
    """(wall s, CPU s) of the merge's own input hashing (sha256 of every input's files, as no download manifest
    records them here): a floor under the merge's time, since the hashes go into the output's header."""
    import resource

    from toolbox.merge.weights import _dir_hashes

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c, t = cpu(), time.perf_counter()
    for d in dirs:
        _dir_hashes(d, "config.json")
    return time.perf_counter() - t, cpu() - c


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--write", action="store_true", help="record the results in bench/RESULTS.md")
    a = ap.parse_args()
    work = a.work / "merge-weights"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        dirs = [make_input(work / name, a.experts, a.vocab, seed) for seed, name in enumerate(("base", "ft1", "ft2"))]
        gib = size_gib(dirs[0])
        os.sync()
        rows = []
        t = time.perf_counter()
        shutil.copytree(dirs[0], work / "copy")
        os.sync()
        cp = time.perf_counter() - t
        shutil.rmtree(work / "copy")
        rows.append(("cp -r + sync of one input", cp, float("nan"), float("nan")))
        rows.append(("read all 3 inputs once (page cache)", read_all(dirs), float("nan"), float("nan")))
        rows.append(("sha256 of all 3 inputs (the merge's input hashes)", *hash_all(dirs), float("nan")))
        env = {**os.environ, "CORRAL_MAU_DECLARATION": "below-700m"}
        for dens in ("0.5", "1"):
            out = work / f"ties-{dens}"
            corral = str(Path(sys.executable).parent / "corral")
            wall, cpu, rss = run_timed([corral, "merge", "--method", "ties", str(dirs[0]), str(dirs[1]),
                                        str(dirs[2]), "--weight", "0.6", "--weight", "0.4", "--density", dens,
                                        "-o", str(out)], env=env)
            shutil.rmtree(out)
            rows.append((f"corral merge --method ties, density {dens}", wall, cpu, rss))
        if not a.no_mergekit:
            cfg = work / "ties.yaml"
            cfg.write_text(f"merge_method: ties\nbase_model: {dirs[0]}\nmodels:\n"
                           f"  - model: {dirs[1]}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                           f"  - model: {dirs[2]}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
                           "dtype: bfloat16\n")
            mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
            wall, cpu, rss = run_timed([mk, str(cfg), str(work / "mk")])
            shutil.rmtree(work / "mk")
            rows.append(("mergekit-yaml, ties density 0.5", wall, cpu, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [MARKER, "",
             f"Three inputs (base + 2) of {gib:.2f} GiB each: one Maverick MoE layer, {a.experts} experts of the real "
             f"shape, vocabulary {a.vocab}, random bf16; 2-core VM shared with other work (loaded), inputs in the "
             f"page cache after being written. Date 2026-12-01. `python bench/bench_merge_weights.py "
             f"--experts {a.experts} --vocab {a.vocab}`.", "",
             "| run | wall s | vs cp | CPU s | max RSS GiB |", "|---|---|---|---|---|"]
    for name, wall, cpu, rss in rows:
        lines.append(f"| {name} | {wall:.1f} | {wall / cp:.2f}x | {'' if cpu != cpu else f'{cpu:.1f}'} | "
                     f"{'' if rss != rss else f'{rss:.2f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        write_section(MARKER, text)


if __name__ == "__main__":
    main()
