"""llama.cpp's own two-step quantizer, kept as the reference for corral's one-pass mixes.

`corral convert --outtype q4_k_m` no longer goes through here: it writes the final file in one
streamed pass (converters.gguf_mix for the types, toolbox.tensors.gguf.ggml for the bytes). Tests
and bench/bench_quantize.py run `llama_model_quantize` from llama-cpp-python on corral's BF16 GGUF
(written with `direct_io=False`: llama.cpp copies general.alignment but lays its output out at 32)
and compare. It copies every KV key, so the license stamp survives; the output is written under a
hidden partial name beside `dst` and renamed into place.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from toolbox.errors import CorralError, UsageError
from toolbox.tensors.atomic import new_partial
from toolbox.tensors.gguf.quant import LLAMA_CPP_OUTTYPES


def _llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("K- and I-quant types need llama.cpp's quantizer",
                         hint="pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp once)") from None
    return llama_cpp


def quantize_file(src: Path, dst: Path, outtype: str, *, threads: int | None = None) -> None:
    """Quantize a GGUF with llama.cpp into `dst` (written under a partial name, then renamed)."""
    llama_cpp = _llama_cpp()
    key = LLAMA_CPP_OUTTYPES[outtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}")
    params.nthread = threads or os.cpu_count() or 1
    tmp = str(new_partial(dst, directory=False))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise CorralError(f"llama.cpp could not quantize {src.name} to {outtype} (code {rc})", path=src)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
