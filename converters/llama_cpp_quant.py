"""K- and I-quants (q4_k_m and friends) through llama.cpp's own quantizer.

corral first writes a BF16/F32 GGUF (streamed, stamped), then `llama_model_quantize` from
llama-cpp-python (an optional extra) turns it into the requested type tensor by tensor,
copying every KV key, so the license stamp survives. The intermediate file lives beside the
output under a hidden partial name and is removed in every case.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

from toolbox.tensors.gguf.quant import LLAMA_CPP_OUTTYPES
from toolbox.errors import CorralError, UsageError
from toolbox.tensors.atomic import PARTIAL_MARK


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
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}{PARTIAL_MARK}", dir=dst.parent)
    os.close(fd)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise CorralError(f"llama.cpp could not quantize {src.name} to {outtype} (code {rc})", path=src)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
