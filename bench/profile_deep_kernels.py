"""Per-core cost of the ways to reduce a bf16 piece to what `verify --deep` reports (issue 15), warm cache.

Each formulation runs single-threaded over the same 8 MiB pieces of a real shard (read once into memory);
the figure is GiB of bf16 per CPU-second (thread CPU time, best of 2), so it hardly depends on other load.
`chunk_stats` is what the scan runs (aminmax, then row sums and row norms in bf16); the others are the
alternatives it was chosen against, each giving part of the same statistics.

Run: python bench/profile_deep_kernels.py [--shard FILE] [--mib 384]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
PIECE = 8 * 1024**2


def main() -> None:
    import numpy as np
    import torch

    from toolbox.verify.deep import BF16_ROW, chunk_stats

    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", type=Path, default=HERE / "work/scout-1layer/model-00004-of-00004.safetensors")
    ap.add_argument("--mib", type=int, default=384)
    a = ap.parse_args()
    torch.set_num_threads(1)
    n = a.mib * 1024**2 // PIECE
    buf = torch.empty(n * PIECE, dtype=torch.uint8)
    fd = os.open(a.shard, os.O_RDONLY)
    try:
        os.preadv(fd, [memoryview(buf.numpy())], 1 << 20)
    finally:
        os.close(fd)
    pieces = [buf[i * PIECE:(i + 1) * PIECE].view(torch.bfloat16) for i in range(n)]
    ones = torch.ones(BF16_ROW, dtype=torch.bfloat16)
    wide = np.empty(PIECE // 2, dtype=np.uint32)

    def numpy_f32(x: Any) -> Any:  # bf16 bits shifted into float32, then numpy/BLAS reductions
        np.left_shift(x.view(torch.int16).numpy().view(np.uint16), 16, out=wide, dtype=np.uint32)
        f = wide.view(np.float32)
        return f.min(), f.max(), f.sum(), np.dot(f, f)

    kernels: dict[str, Callable[[Any], Any]] = {
        "chunk_stats (the scan: aminmax + row sum + row norm)": chunk_stats,
        "torch.aminmax (min, max, NaN/Inf shows)": torch.aminmax,
        "row sums, bf16": lambda x: x.view(-1, BF16_ROW).sum(dim=1),
        "row norms, bf16 (vector_norm)": lambda x: torch.linalg.vector_norm(x.view(-1, BF16_ROW), dim=1),
        "row sums as bf16 matmul with ones": lambda x: x.view(-1, BF16_ROW) @ ones,
        "sum accumulated as float32 (dtype=)": lambda x: x.sum(dtype=torch.float32),
        "dot(x, x), bf16": lambda x: torch.dot(x, x),
        "var_mean (one Welford pass)": lambda x: torch.var_mean(x, correction=0),
        "non-finite from bits ((b & 0x7F80) == 0x7F80)": lambda x: bool(((x.view(torch.int16) & 0x7F80) == 0x7F80)
                                                                     .any()),
        "isfinite().all()": lambda x: bool(torch.isfinite(x).all()),
        "numpy: to float32 + min, max, sum, BLAS dot": numpy_f32,
    }
    print(f"{n} pieces of 8 MiB from {a.shard.name}; GiB of bf16 per CPU-second, one thread")
    for name, f in kernels.items():
        best = float("inf")
        for _ in range(2):
            t = time.thread_time()
            for x in pieces:
                f(x)
            best = min(best, time.thread_time() - t)
        print(f"{name:52s} {n * PIECE / 2**30 / best:7.2f}", flush=True)


if __name__ == "__main__":
    main()
