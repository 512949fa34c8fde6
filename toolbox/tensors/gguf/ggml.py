"""ggml's own quantizer, in-process: ctypes on the libggml-base that llama-cpp-python ships.

Every ggml type (K-quants, I-quants, legacy and ternary) is encoded by the same C kernels
llama.cpp's `llama-quantize` calls (`ggml_quantize_chunk`), so the bytes are the ones llama.cpp
would write. The kernels quantize rows independently and release the GIL (ctypes calls do), so
a slice is cut into row blocks and encoded by a small thread pool, one block per core at a time.
The library is found next to the `llama_cpp` package without importing it (that would also load
libllama and initialise its backends).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, CorralError, UsageError

if TYPE_CHECKING:
    import numpy as np

INSTALL_HINT = "pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp once)"
BLOCK_BYTES = 4 * 1024**2  # float32 input per task: big enough to amortise the call, small enough to balance
SUB_ELEMENTS = 256 * 1024  # converted and quantized at once: the float32 rows (1 MiB) stay in a core's L2
TILE = 128  # a strided (transposed) source is copied in TILE x GATHER tiles, each small enough for L1
GATHER = 128  # rows of a strided source made contiguous at once (long runs per source row: ~4x faster than 51)
GATHER_BYTES = 4 * 1024**2  # bound on that per-thread buffer, for sources with very long rows
# ggml type ids (ggml.h, enum ggml_type) of types gguf-py 0.19 has no name for
EXTRA_TYPE_IDS = {"Q2_0": 42}

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_initialised: set[int] = set()
_available: bool | None = None
OUT_POOL_SIZE = 8  # result buffers kept for reuse while `reused_outputs` is on (a stream holds ~3 in flight)
OUT_POOL_MIN_BYTES = 1 << 20
_out_pool: list[np.ndarray] | None = None
_out_users = 0


def library_path() -> Path:
    """libggml-base.so inside the installed llama_cpp package (CorralError with the install hint if absent)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise UsageError("GGUF quantization needs ggml, which llama-cpp-python ships", hint=INSTALL_HINT)
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).is_file():
            return libdir / name
    raise UsageError(f"{libdir}: llama-cpp-python has no libggml-base library", hint=INSTALL_HINT)


def lib() -> ctypes.CDLL:
    """The loaded library with the prototypes corral calls."""
    global _lib
    with _lock:
        if _lib is None:
            dll = ctypes.CDLL(str(library_path()))
            i64, sz, c_int, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
            protos: dict[str, tuple[Any, list[Any]]] = {
                "ggml_quantize_chunk": (sz, [c_int, vp, vp, i64, i64, i64, vp]),
                "ggml_quantize_requires_imatrix": (ctypes.c_bool, [c_int]),
                "ggml_quantize_init": (None, [c_int]),
                "ggml_row_size": (sz, [c_int, i64]),
                "ggml_type_size": (sz, [c_int]),
                "ggml_blck_size": (i64, [c_int]),
                "ggml_is_quantized": (ctypes.c_bool, [c_int]),
                "ggml_validate_row_data": (ctypes.c_bool, [c_int, vp, sz]),
                "ggml_type_name": (ctypes.c_char_p, [c_int]),
                "ggml_bf16_to_fp32_row": (None, [vp, vp, i64]),
                "ggml_fp16_to_fp32_row": (None, [vp, vp, i64]),
            }
            for fname, (res, args) in protos.items():
                fn = getattr(dll, fname)
                fn.restype, fn.argtypes = res, args
            _lib = dll
        return _lib


def available() -> bool:
    """Whether ggml's library can be loaded (llama-cpp-python is installed): callers with a pure-Python
    twin of a kernel (Q8_0) use ggml's when it is there."""
    global _available
    if _available is None:
        try:
            lib()
            _available = True
        except (CorralError, OSError, AttributeError):
            _available = False
    return _available


def type_id(name: str) -> int:
    """The ggml type id of a GGML type name (Q4_K, IQ4_XS, ...): gguf-py's enum has ggml's numbering."""
    import gguf

    key = name.upper()
    if key in EXTRA_TYPE_IDS:
        return EXTRA_TYPE_IDS[key]
    try:
        return int(gguf.GGMLQuantizationType[key])
    except KeyError:
        raise UsageError(f"unknown ggml type {name!r}") from None


def block_size(name: str) -> int:
    """Elements per block of a ggml type (256 for K-quants)."""
    return int(lib().ggml_blck_size(type_id(name)))


def type_size(name: str) -> int:
    """Bytes per block of a ggml type."""
    return int(lib().ggml_type_size(type_id(name)))


def row_size(name: str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements."""
    return int(lib().ggml_row_size(type_id(name), n_per_row))


def requires_imatrix(name: str) -> bool:
    """True for types ggml refuses to quantize without an importance matrix (it would abort the process)."""
    return bool(lib().ggml_quantize_requires_imatrix(type_id(name)))


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="corral-ggml")
        return _pool


def _init(tid: int) -> None:
    """Grid tables of the I-quants, built once before the threads start (ggml would do it under a spinlock)."""
    if tid not in _initialised:
        lib().ggml_quantize_init(tid)
        _initialised.add(tid)


def quantize(x: Any, qtype_name: str, *, imatrix: np.ndarray | None = None, what: str = "tensor",
             workers: int | None = None, carry: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The bytes of float rows `x` ([..., n_per_row]) in ggml type `qtype_name`, as uint8.

    `x`: a numpy array or torch tensor of float32, float16 or bfloat16 (any other dtype is cast first); a 2-D
    one may have any strides (a transposed view is read in tiles, so no transposed copy is made). Each task
    turns a few rows into float32 in a per-thread buffer and quantizes them while they are in cache.
    `imatrix`: one importance weight per column (float32, n_per_row), or None. `what` names the tensor
    in errors. `carry`: an encoder for rows whose source holds NaN/Inf (float32 rows in, bytes out), so
    that they are encoded as the caller's reference does; with it, checking the scales is the caller's.
    Row blocks are encoded in parallel; the result equals one `ggml_quantize_chunk` over all rows.
    """
    import numpy as np

    dll = lib()
    tid = type_id(qtype_name)
    rows = _Rows(x)
    n_per_row, nrows = rows.n_per_row, rows.nrows
    block = int(dll.ggml_blck_size(tid))
    if n_per_row % block:
        raise UsageError(f"{what}: rows of {n_per_row} are not a multiple of {qtype_name}'s block of {block}")
    if imatrix is None and dll.ggml_quantize_requires_imatrix(tid):
        raise UsageError(f"{what}: type {qtype_name} needs an importance matrix", hint="choose another --outtype")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise BadInputError(f"{what}: importance matrix has {imatrix.size} values, rows have {n_per_row}")
    rsize = int(dll.ggml_row_size(tid, n_per_row))
    out = _out_buffer(nrows * rsize)
    if nrows == 0:
        return out
    _init(tid)
    n_workers = workers or max(1, os.cpu_count() or 1)
    step = max(1, min(BLOCK_BYTES // (4 * n_per_row), -(-nrows // n_workers)))
    sub = max(1, SUB_ELEMENTS // n_per_row)
    dst0 = out.ctypes.data
    imat = imatrix.ctypes.data if imatrix is not None else None

    def run(r0: int) -> None:
        end = min(r0 + step, nrows)
        for g0 in range(r0, end, rows.gather):
            block = rows.block(g0, min(rows.gather, end - g0))
            for j in range(0, block.shape[0], sub):
                s, src = g0 + j, rows.float32_of(block[j:j + sub])
                n = src.shape[0]
                if carry is not None and not _finite(src):
                    out[s * rsize:(s + n) * rsize] = carry(src)
                    continue
                size = dll.ggml_quantize_chunk(tid, src.ctypes.data, dst0 + s * rsize, 0, n, n_per_row, imat)
                if size != n * rsize:
                    raise CorralError(f"{what}: ggml wrote {size} bytes for {n} rows of {qtype_name}, "
                                      f"expected {n * rsize}")
        if carry is None and not dll.ggml_validate_row_data(tid, dst0 + r0 * rsize, (end - r0) * rsize):
            raise BadInputError(f"{what}: rows {r0}..{end - 1} quantize to non-finite {qtype_name} scales "
                                "(weights beyond float16's range, or Inf)",
                                hint="run `corral verify --deep` on the source, or write bf16/f32")

    starts = range(0, nrows, step)
    if len(starts) == 1 or n_workers == 1:
        for r0 in starts:
            run(r0)
    else:
        futures = [_workers().submit(run, r0) for r0 in starts]
        wait(futures)  # every writer into `out` has finished before an error propagates and frees it
        for f in futures:
            f.result()
    return out


@contextlib.contextmanager
def reused_outputs() -> Iterator[None]:
    """Within it, `quantize` results come from a small pool: a buffer is reused once nothing but the pool refers
    to it (Python's refcount of the array; every view and memoryview of a result holds one). A fresh result of
    tens of MB is new memory whose every page (huge page) faults in and is zeroed on first write: measured on
    the Scout layer's q8_0 conversion, those faults under ggml's kernel were ~2% of the run's CPU."""
    global _out_pool, _out_users
    with _lock:
        _out_users += 1
        if _out_pool is None:
            _out_pool = []
    try:
        yield
    finally:
        with _lock:
            _out_users -= 1
            if not _out_users:
                _out_pool = None


def _out_buffer(n: int) -> np.ndarray:
    """n bytes for a result of `quantize`: fresh, or a free pooled buffer while `reused_outputs` is on."""
    import numpy as np

    with _lock:
        pool = _out_pool
        if pool is None or n < OUT_POOL_MIN_BYTES:
            return np.empty(n, dtype=np.uint8)
        free = [i for i in range(len(pool)) if sys.getrefcount(pool[i]) <= 2]  # the list's and the call's
        fits = [i for i in free if pool[i].size >= n]
        if fits:
            return pool[min(fits, key=lambda i: pool[i].size)][:n]
        for i in reversed(free):  # all too small: dropped, so that the pool holds only what is in flight
            del pool[i]
        buf = np.empty(n, dtype=np.uint8)
        if len(pool) < OUT_POOL_SIZE:
            pool.append(buf)
        return buf[:n]


def _finite(rows: np.ndarray) -> bool:
    """Whether float32 rows hold no NaN/Inf: one summing pass (in cache), the exact test only if the sum is not
    finite (NaN/Inf, or finite values whose sum overflows)."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(rows, axis=None)
    return bool(np.isfinite(total)) or bool(np.isfinite(rows).all())


class _Rows:
    """A 2-D view of float rows whose row blocks come out as contiguous float32, converted per thread.

    float32 rows that are already contiguous are used in place; contiguous bf16/f16 go through ggml's own
    row converters; any other layout (a transposed expert slice) is first made contiguous in its own dtype,
    `gather` rows at a time (`block`), then converted like contiguous rows. bf16 -> f32 is exact (the 16
    bits shifted up), as are f16 -> f32 and the copies: the bytes do not depend on the path.
    """

    def __init__(self, x: Any) -> None:
        import numpy as np

        if hasattr(x, "detach"):  # a torch tensor: a numpy view of the same memory (bf16 as its raw 16 bits)
            import torch

            if x.dtype == torch.bfloat16:
                arr, self.kind = x.detach().view(torch.int16).numpy().view(np.uint16), "bf16"
            elif x.dtype in (torch.float16, torch.float32):
                arr, self.kind = x.detach().numpy(), str(x.dtype).removeprefix("torch.")
            else:
                arr, self.kind = x.detach().to(torch.float32).numpy(), "float32"
        else:
            arr = np.asarray(x)
            if arr.dtype not in (np.float16, np.float32):
                arr = arr.astype(np.float32)
            self.kind = str(arr.dtype)
        if arr.ndim != 2:
            arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
        self.arr = arr
        self.nrows, self.n_per_row = (int(d) for d in arr.shape)
        self.gather = max(1, min(GATHER, GATHER_BYTES // max(1, arr.itemsize * self.n_per_row)))
        self._local = threading.local()

    def float32(self, r0: int, n: int) -> np.ndarray:
        """Rows r0..r0+n as a contiguous float32 [n, n_per_row] array (valid until this thread's next call)."""
        return self.float32_of(self.block(r0, n))

    def block(self, r0: int, n: int) -> np.ndarray:
        """Rows r0..r0+n (`gather` at a time is the fast size) with contiguous rows, in the source's dtype: a
        view when they are contiguous already, else a copy in this thread's buffer (valid until its next call).

        A transposed source is copied through a small [TILE, n] tile: reading it takes runs of n elements per
        source row (a direct strided copy reads one element per row and runs ~4x slower), writing it out
        transposed stays in L1. Copies are exact, so the bytes do not depend on the path."""
        import numpy as np

        src = self.arr[r0:r0 + n]
        if src.flags.c_contiguous:
            return src
        loc = self._local
        if getattr(loc, "rows", None) is None or loc.rows.shape[0] < n:
            loc.rows = np.empty((max(n, self.gather), self.n_per_row), dtype=self.arr.dtype)
            loc.tile = np.empty((TILE, max(n, self.gather)), dtype=self.arr.dtype)
        dst = loc.rows[:n]
        if src.strides[1] == src.itemsize:  # rows contiguous, only spaced apart: one copy
            np.copyto(dst, src)
            return dst
        for c in range(0, self.n_per_row, TILE):
            w = min(TILE, self.n_per_row - c)
            tile = loc.tile[:w, :n]
            np.copyto(tile, src[:, c:c + w].T)
            np.copyto(dst[:, c:c + w], tile.T)
        return dst

    def float32_of(self, rows: np.ndarray) -> np.ndarray:
        """Contiguous rows of the source's dtype (from `block`) as float32: in place for float32, else through
        ggml's own row converter into this thread's float32 buffer (valid until its next call)."""
        import numpy as np

        if self.kind == "float32":
            return rows
        n = rows.shape[0]
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < n:
            buf = self._local.buf = np.empty((n, self.n_per_row), dtype=np.float32)
        dst = buf[:n]
        convert = lib().ggml_bf16_to_fp32_row if self.kind == "bf16" else lib().ggml_fp16_to_fp32_row
        convert(rows.ctypes.data, dst.ctypes.data, rows.size)
        return dst
