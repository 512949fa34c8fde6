"""SafetensorsSource's pooled read buffers (`reuse_buffers`, which weight merges and GGUF conversion set): a
read larger than every free buffer drops those, even when a buffer still in use sits before them in the pool
(list.remove compared tensors elementwise there and raised for buffers of other sizes)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from toolbox.tensors.safetensors_source import POOL_MIN_BYTES, SafetensorsSource


def test_larger_read_after_a_held_and_a_free_buffer(tmp_path: Path) -> None:
    n = POOL_MIN_BYTES // 4
    tensors = {"a": torch.arange(n, dtype=torch.float32), "b": torch.arange(n, dtype=torch.float32) + 1,
               "big": torch.arange(3 * n, dtype=torch.float32) - 5}
    save_file(tensors, tmp_path / "model.safetensors")
    src = SafetensorsSource(tmp_path / "model.safetensors")
    src.reuse_buffers = True
    try:
        held = src.load("a")  # in use: the first buffer in the pool
        freed = src.load("b")
        assert torch.equal(freed, tensors["b"])
        del freed  # free, and too small for the next read
        big = src.load("big")
        assert torch.equal(big, tensors["big"]) and torch.equal(held, tensors["a"])
        assert len(src._pool) == 2  # the free small buffer dropped, the held one kept beside the new one
        again = src.load("b")  # reuses no buffer still in use
        assert torch.equal(again, tensors["b"]) and torch.equal(held, tensors["a"]) and torch.equal(big, tensors["big"])
    finally:
        src.close()
