"""An importance matrix applied to a planned GGUF: which tensor gets which weights, and the keys
llama-quantize records.

llama-quantize (src/llama-quant.cpp) looks each quantized tensor up by its GGUF name; an entry must
hold ne0 x experts values (a 3-D `*_exps` tensor gets one row per expert; a mismatch is an error except
for token_embd, which is then quantized without); a tensor whose type needs an imatrix and has no entry
is refused. The output records quantize.imatrix.file, .dataset, .entries_count and .chunks_count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters import gguf_mix
from toolbox.errors import BadInputError
from toolbox.tensors.gguf.imatrix import ImatrixFile

FLOATS = ("F32", "F16", "BF16")
MAX_KV_STRING = 127  # llama-quantize copies the file name and dataset into 128-byte override slots


@dataclass
class ImatrixRows:
    """One tensor's entry, read an expert row at a time (3-D) or once (2-D)."""

    file: ImatrixFile
    name: str
    three_d: bool
    ne0: int  # the tensor's row width
    _whole: Any = None

    def row(self, expert: int) -> Any:
        """The weights for expert `expert`'s rows (any piece of a 2-D tensor: the whole entry)."""
        if self.three_d:
            return self.file.weights(self.name, expert * self.ne0, self.ne0)
        if self._whole is None:
            self._whole = self.file.weights(self.name)
        return self._whole


def attach(plan: Sequence[Any], imat: ImatrixFile, ftype: str) -> None:
    """Give every planned tensor that is quantized its imatrix entry (`p.imatrix`); BadInputError naming
    the file and the tensor for an entry of the wrong size or a missing one that the type needs."""
    from toolbox.tensors.gguf import ggml

    for p in plan:
        if p.qtype in FLOATS:
            continue
        ne2 = p.shape[0] if len(p.shape) == 3 else 1
        want = p.shape[-1] * ne2
        if p.name in imat.entries:
            got = imat.size(p.name)
            if got == want:
                p.imatrix = ImatrixRows(imat, p.name, len(p.shape) == 3, p.shape[-1])
                continue
            if gguf_mix.category(p.name) != "token_embd":
                raise BadInputError(f"{imat.path}: imatrix entry {p.name} has {got} values, the tensor needs {want}"
                                    f" ({p.shape[-1]} x {ne2} experts)",
                                    hint="the imatrix was made for another model", path=imat.path)
        if gguf_mix.requires_imatrix(p.name, p.qtype, ftype) or ggml.requires_imatrix(p.qtype):
            raise BadInputError(f"{imat.path}: no importance matrix for {p.name}, which is quantized to {p.qtype}",
                                hint="make the imatrix on this model (llama-imatrix), or drop "
                                "--include-weights/--exclude-weights that removed it", path=imat.path)


def add_imatrix_kv(writer: Any, imat: ImatrixFile) -> None:
    """The keys llama-quantize writes for an imatrix. The file is recorded by its name alone (not the
    directory it was read from)."""
    writer.add_string("quantize.imatrix.file", _clip(Path(imat.path).name))
    if imat.datasets:
        writer.add_string("quantize.imatrix.dataset", _clip(imat.datasets[0]))
    writer.add_uint32("quantize.imatrix.entries_count", len(imat.entries))
    if imat.chunk_count > 0:
        writer.add_uint32("quantize.imatrix.chunks_count", imat.chunk_count)


def _clip(text: str) -> str:
    """strncpy into llama.cpp's 128-byte slot: at most 127 bytes (whole UTF-8 characters here)."""
    return text.encode()[:MAX_KV_STRING].decode("utf-8", "ignore")
