"""Issue 20 benchmark: a prune whose safetensors shards fan out as Ray tasks (one per shard, one for the
rest), on 1 node against 2 nodes on this machine, and against the local executor (one process) in the same
run. Source: the Scout-shaped one-layer checkpoint in bench/work/scout-1layer (read-only).

On one machine "2 nodes" is two Ray node processes sharing its two cores and its one disk; a prune is a copy
(the kept experts' rows go file to file in the kernel), so this measures the executor's overhead and how
much two writers overlap on one disk, not a cluster's speed-up (see README "Recipes on a Ray cluster").
Every run starts from an empty object cache; each run's output directory is compared file by file with
the local run's (sha256) and deleted before the next.

Run:  python bench/bench_shard_fanout.py [--source DIR] [--keep 4] [--shard-size 1G]
Disk: one pruned output at a time (4 of 16 experts of the 8.1 GiB layer: ~5.4 GB), removed when done.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_recipe_ray import free_port, run, start_node, stop_group  # noqa: E402

RECIPE = """\
corral: 1
name: bench-shards
source: {source}
license: {{mau_declaration: below-700m}}
steps:
  - id: pruned
    uses: prune
    with: {{keep: [{keep}], shard_size: {shard_size}, name: Llama-4-bench-pruned}}
    output: Llama-4-bench-pruned
"""


def tree_hashes(out: Path) -> dict[str, str]:
    """relative name -> sha256 of every file of the published directory (not the run record)."""
    result = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "corral-recipe.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            result[p.relative_to(out).as_posix()] = h.hexdigest()
    return result


def measure(recipe: Path, work: Path, temp: Path) -> tuple[list[tuple[str, float]], int]:
    """(run, seconds) for the local executor, then Ray on 1 node, then on 2; and the number of shards."""
    from toolbox.recipe import load_recipe, run_recipe

    rows: list[tuple[str, float]] = []
    ref: dict[str, str] = {}
    cache, out = work / "cache", work / "out"

    def timed(label: str, **kw: object) -> None:
        rows.append((label, run(recipe, out, cache, **kw)))
        got = tree_hashes(out)
        if not ref:
            ref.update(got)
        assert got == ref, f"{label} wrote different bytes"
        shutil.rmtree(out, ignore_errors=True)

    run_recipe(load_recipe(recipe), out, cache_dir=cache, dry_run=True)  # hashes the source, untimed
    timed("local executor (one process)", executor="local", jobs=1)
    shards = sum(1 for n in ref if n.endswith(".safetensors"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--object-store-memory=100000000"]
    groups: list[int] = []
    try:
        groups.append(start_node(["--head", f"--port={port}", '--resources={"node_a": 1}', f"--temp-dir={temp}",
                                  "--include-dashboard=false", *common], env))
        timed("ray executor, 1 node (1 CPU)", executor="ray", address=address)
        groups.append(start_node([f"--address={address}", '--resources={"node_b": 1}', *common], env))
        time.sleep(5)  # let the second node register
        timed("ray executor, 2 nodes (1 CPU each)", executor="ray", address=address)
    finally:
        for g in reversed(groups):
            stop_group(g)
    return rows, shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=HERE / "work" / "scout-1layer")
    ap.add_argument("--keep", type=int, default=4, help="experts kept (the first N)")
    ap.add_argument("--shard-size", default="1G")
    a = ap.parse_args()
    if not (a.source / "config.json").is_file():
        raise SystemExit(f"{a.source}: no checkpoint (python bench/bench_gguf.py creates bench/work/scout-1layer)")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private cluster on 127.0.0.1
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=HERE / "work"))
    temp = Path(tempfile.mkdtemp(prefix="bshr", dir="/tmp"))
    recipe = work / "shards.yaml"
    recipe.write_text(RECIPE.format(source=a.source.resolve(), keep=", ".join(map(str, range(a.keep))),
                                    shard_size=a.shard_size))
    load0 = os.getloadavg()[0]
    try:
        rows, shards = measure(recipe, work, temp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    one = next(t for label, t in rows if label.startswith("ray executor, 1 node"))
    lines = [f"## Sharded prune fanned out per shard on Ray (issue 20) — 2026-12-01, {platform.machine()}, "
             f"{os.cpu_count()} cores",
             f"Command: `python bench/bench_shard_fanout.py --keep {a.keep} --shard-size {a.shard_size}`. Source: "
             f"`{a.source.name}` (Scout-shaped layer, 8.1 GiB bf16), {a.keep} of 16 experts kept: {shards} shard "
             f"files, each one task, plus one task for the rest. Every run wrote byte-identical files.", "",
             "| run | wall | vs ray 1 node |", "|---|---|---|"]
    lines += [f"| {label} | {t:.1f} s | {t / one:.2f}x |" for label, t in rows]
    lines += ["", f"Load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (a 2-core VM shared "
              "with other engineers' work and CI)."]
    for line in lines:
        print(line)
    for label, t in rows:
        print(f"RATIO {label}: {t / one:.2f}x of ray 1 node")


if __name__ == "__main__":
    main()
