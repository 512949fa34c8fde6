"""A cache-blocked 2-D transpose.

`t.T.contiguous()` on a large bf16 matrix walks the source with a stride of a whole row and runs
at ~0.35 GB/s on this machine class; copying 256x256 tiles keeps both sides in cache and is about
twice as fast (measured on 5120x8192 bf16: 0.23 s -> 0.11 s). Expert tensors are transposed on
every HF <-> GGUF conversion, so this is on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TILE = 256


def transpose2d(t: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """`t.T` as a new contiguous tensor (t may be any strided 2-D view)."""
    import torch

    rows, cols = t.shape
    if rows * cols < tile * tile * 4:
        return t.T.contiguous()
    out = torch.empty((cols, rows), dtype=t.dtype)
    for c in range(0, cols, tile):
        block = out[c:c + tile]
        for r in range(0, rows, tile):
            block[:, r:r + tile] = t[r:r + tile, c:c + tile].T
    return out
