"""Streaming tensor data into gguf-py's GGUFWriter, one piece at a time.

GGUFWriter's own path holds every tensor until the end (or takes a whole array per call);
for an expert tensor of 20 GiB we need to hand it one expert at a time. We use the writer for
everything it does well (header, KV, tensor info, split files, alignment) and write a
tensor's bytes in pieces with the same padding rules as `write_tensor_data`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def begin_data(writer: Any) -> None:
    """Header, KV and tensor-info sections of every split, then the data alignment."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def write_tensor_pieces(writer: Any, name: str, pieces: Iterable[memoryview | bytes]) -> int:
    """Write the next declared tensor (it must be `name`) from byte pieces; returns bytes written."""
    import gguf

    if writer.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS):
        raise RuntimeError(f"GGUF writer is in state {writer.state}, not ready for tensor data")
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    fout = writer.fout[file_id]
    first = next(iter(writer.tensors[file_id]))
    if first != name:
        raise RuntimeError(f"GGUF tensors out of order: expected {first!r}, got {name!r}")
    info = writer.tensors[file_id].pop(first)
    writer.write_padding(fout, fout.tell())
    written = 0
    for piece in pieces:
        fout.write(piece)
        written += piece.nbytes if isinstance(piece, memoryview) else len(piece)
    if written != info.nbytes:
        raise RuntimeError(f"{name}: wrote {written} bytes, declared {info.nbytes}")
    writer.write_padding(fout, written)
    writer.state = gguf.WriterState.WEIGHTS
    return written
