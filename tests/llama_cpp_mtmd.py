"""Image embeddings from llama.cpp's multimodal runtime (libmtmd, via llama-cpp-python's ctypes
bindings): the consumer an mmproj GGUF is written for, used to check corral's mmproj files
against transformers (tests, bench/bench_mmproj.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, UsageError

if TYPE_CHECKING:
    import numpy as np


class MtmdRuntime:
    """A text GGUF loaded in llama.cpp, ready to encode images with any matching mmproj."""

    def __init__(self, text_gguf: str | Path, *, n_threads: int = 2) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise UsageError("running an mmproj needs llama.cpp",
                             hint="pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp once)") from None
        self.n_threads = n_threads
        self.llm: Any = llama_cpp.Llama(str(text_gguf), n_ctx=256, verbose=False, n_threads=n_threads)

    @property
    def n_embd(self) -> int:
        return int(self.llm.n_embd())

    def image_embeddings(self, mmproj: str | Path, rgb: np.ndarray, *, flash_attn: bool = False) -> np.ndarray:
        """[tokens, n_embd] float32 for one H x W x 3 uint8 image, in llama.cpp's token order.

        Flash attention is off by default: on CPU it rounds K and V to f16."""
        import numpy as np
        from llama_cpp import mtmd_cpp as m

        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise UsageError("image must be an H x W x 3 uint8 array")
        params = m.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, self.n_threads, False, False
        params.flash_attn_type = 1 if flash_attn else 0
        ctx = m.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not ctx:
            raise BadInputError(f"{mmproj}: llama.cpp's multimodal runtime could not load it", path=Path(mmproj))
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb).tobytes())
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text()
            marker = m.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            if m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
                raise BadInputError(f"{mmproj}: llama.cpp could not tokenize the image", path=Path(mmproj))
            all_chunks = [m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))]
            images = [c for c in all_chunks if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            outs = []
            for chunk in images:  # one for an image that fits one tile; more when llama.cpp slices it
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                if m.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise BadInputError(f"{mmproj}: llama.cpp failed to encode the image", path=Path(mmproj))
                emb = m.mtmd_get_output_embd(ctx)
                outs.append(np.ctypeslib.as_array(emb, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
            return np.concatenate(outs)
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
            m.mtmd_free(ctx)


def grid_transposed(rows: np.ndarray) -> np.ndarray:
    """Rows of a square token grid read column by column: llama.cpp's llama4 graph leaves out the last
    permute of transformers' pixel shuffle, so it emits transformers' token grid in this order."""
    side = round(len(rows) ** 0.5)
    return rows.reshape(side, side, -1).transpose(1, 0, 2).reshape(len(rows), -1)


def relative_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """max |got - ref| / max |ref| in the token order that matches best ("row-major" is transformers')."""
    import numpy as np

    scale = float(np.abs(ref).max())
    errs = {"row-major": float(np.abs(got - ref).max()) / scale,
            "column-major": float(np.abs(got - grid_transposed(ref)).max()) / scale}
    order = min(errs, key=lambda k: errs[k])
    return errs[order], order
