"""The fast encoding paths of GGUF conversion: ggml's kernels fed straight from bf16/f16 and from transposed
views (no float32 or transposed copy of a piece), and the chained prefetch stages that overlap reading,
encoding and writing.

References: gguf-py's numpy quantizer (Q8_0, the bytes llama.cpp's converter writes) and one plain
`ggml_quantize_chunk` call on a float32 copy made by torch (the K-quants, as llama-quantize calls it).
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import gguf
import numpy as np
import pytest
import torch

from toolbox.tensors.gguf import ggml
from toolbox.tensors.gguf.quant import encode
from toolbox.tensors.prefetch import prefetch


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks of 5 rows, made contiguous 3 rows and converted 2 rows at a time: ragged task, gather-block and
    sub-block ends on small inputs."""
    monkeypatch.setattr(ggml, "BLOCK_BYTES", 5 * 4 * 768)
    monkeypatch.setattr(ggml, "SUB_ELEMENTS", 2 * 768)
    monkeypatch.setattr(ggml, "TILE", 96)
    monkeypatch.setattr(ggml, "GATHER", 3)


def _source() -> torch.Tensor:
    """A fused gate_up-like bf16 slice [H=768, 2I=2*512] with zero blocks, outliers and exact .5 ties."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(768, 1024, generator=g) * 0.05
    x[:32, 3] = 0.0
    x[100, 17] = 3.0
    x[64:96, 40] = torch.arange(32) * 0.5
    return x.to(torch.bfloat16)


def _views(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"gate (transposed bf16)": t[:, :512].T, "up (transposed bf16)": t[:, 512:].T,
            "down-like (contiguous bf16)": t[:, :768].contiguous(), "row-spaced bf16": t[:512, :768],
            "transposed f16": t.to(torch.float16)[:, 256:].T,
            "transposed f32": t.float()[:, :768].T, "contiguous f32": t.float()[:512, :768].contiguous()}


def _gguf_py_q8_0(v: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN/Inf rows
        return gguf.quants.quantize(v.float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1)


@pytest.mark.usefixtures("small_blocks")
def test_q8_0_from_views_equals_gguf_py() -> None:
    for label, v in _views(_source()).items():
        assert np.array_equal(np.frombuffer(encode(v, "Q8_0"), np.uint8), _gguf_py_q8_0(v)), label


@pytest.mark.usefixtures("small_blocks")
def test_q8_0_carries_nan_and_inf_as_gguf_py(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks holding NaN/Inf are encoded as gguf-py encodes them (ggml's max() would drop a NaN), with ggml
    and with the torch twin used without llama-cpp-python; a block scale past f16 from finite values is refused."""
    from toolbox.tensors.finite import NonFiniteError

    t = _source().float()
    t[5, 30], t[300, 2], t[301, 9] = float("nan"), float("inf"), -float("inf")
    v = t.to(torch.bfloat16)[:, :512].T
    ref = _gguf_py_q8_0(v)
    assert np.array_equal(np.frombuffer(encode(v, "Q8_0"), np.uint8), ref)
    monkeypatch.setattr(ggml, "_available", False)
    assert np.array_equal(np.frombuffer(encode(v, "Q8_0"), np.uint8), ref)
    monkeypatch.setattr(ggml, "_available", None)
    big = _source()[:, :512].T.float()
    big[3, 7] = 1e10
    with pytest.raises(NonFiniteError, match="Q8_0"):
        encode(big, "Q8_0")


def _one_call(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One ggml_quantize_chunk over every row of a contiguous float32 array, as llama-quantize calls it."""
    dll, tid = ggml.lib(), ggml.type_id(qtype)
    ggml.lib().ggml_quantize_init(tid)
    out = np.empty(x.shape[0] * ggml.row_size(qtype, x.shape[1]), np.uint8)
    imat = ctypes.c_void_p(imatrix.ctypes.data) if imatrix is not None else None
    dll.ggml_quantize_chunk(tid, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], imat)
    return out


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS", "Q5_0"])
def test_ggml_types_from_views_equal_one_call_on_float32(qtype: str) -> None:
    imatrix = np.random.default_rng(2).uniform(0.1, 2.0, 768).astype(np.float32)
    for label, v in _views(_source()).items():
        if v.shape[1] != 768:
            continue
        ref = _one_call(v.float().contiguous().numpy(), qtype)
        assert np.array_equal(ggml.quantize(v, qtype), ref), (qtype, label)
        ref_imat = _one_call(v.float().contiguous().numpy(), qtype, imatrix)
        assert np.array_equal(ggml.quantize(v, qtype, imatrix=imatrix), ref_imat), (qtype, label)


def _stages() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "corral-prefetch"}


def test_chained_prefetch_keeps_order_and_stops_every_stage() -> None:
    before = _stages()

    def numbers(n: int):
        yield from range(n)

    def doubled(items):
        for i in items:
            yield 2 * i

    assert list(prefetch(doubled(prefetch(numbers(50), depth=1)), depth=1)) == list(range(0, 100, 2))
    chain = prefetch(doubled(prefetch(numbers(10**9), depth=1)), depth=1)  # stopped early by its consumer
    assert [next(chain) for _ in range(3)] == [0, 2, 4]
    chain.close()
    assert _stages() == before  # both producer threads have ended


def test_chained_prefetch_raises_the_first_stages_error() -> None:
    def reads():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch((x for x in prefetch(reads(), depth=1)), depth=1))
