"""ggml.reused_outputs: a result buffer is reused only once nothing refers to it, and the bytes stay ggml's."""

from __future__ import annotations

import numpy as np

from toolbox.tensors.gguf import ggml


def test_pooled_buffer_reused_only_when_free() -> None:
    with ggml.reused_outputs():
        a = ggml._out_buffer(2 << 20)
        first = a.ctypes.data
        b = ggml._out_buffer(2 << 20)
        assert b.ctypes.data != first  # `a` still alive
        view = memoryview(a).cast("B")  # as the writer holds a piece
        del a
        c = ggml._out_buffer(2 << 20)
        assert c.ctypes.data not in (first, b.ctypes.data)  # a memoryview of it is still alive
        del view
        d = ggml._out_buffer(1 << 21)
        assert d.ctypes.data == first  # free again: reused
    assert ggml._out_pool is None  # the pool lives only inside the context
    e = ggml._out_buffer(2 << 20)
    assert e.base is None  # outside it: plain fresh memory


def test_pooled_results_equal_fresh_ones() -> None:
    """Consecutive Q8_0 results through the pool (the previous one dropped each time) equal fresh ones."""
    rng = np.random.default_rng(1)
    rows = [(rng.standard_normal((256, 8192)) * 0.02).astype(np.float32) for _ in range(3)]  # 2.2 MB results
    fresh = [ggml.quantize(r, "Q8_0").copy() for r in rows]
    addresses = set()
    with ggml.reused_outputs():
        for r, want in zip(rows, fresh, strict=True):
            got = ggml.quantize(r, "Q8_0")
            addresses.add(got.ctypes.data)
            assert np.array_equal(got, want)
            del got
    assert len(addresses) == 1  # one buffer served all three
