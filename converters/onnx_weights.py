"""Stream a checkpoint's weights into an ONNX external-data file, one tensor (or one expert) at a time.

The graph is exported with its parameters on the meta device, so no weight is ever in RAM at
export time; this module lays the file out (offsets aligned for memory mapping), points every
initializer at its bytes, and then copies the bytes from the safetensors source, converting the
dtype slice by slice. Peak memory is one tensor, or one expert of a fused expert tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorruptFileError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.finite import cast_checked

if TYPE_CHECKING:
    import torch

    from toolbox.tensors.source import TensorSource

DATA_FILE = "model.onnx.data"
_ALIGN_BIG = 4096  # page alignment lets onnxruntime memory-map large initializers
_ALIGN_SMALL = 64
PIECE_BYTES = 64 * 1024**2  # target size of one row block in the output dtype


@dataclass(frozen=True)
class Placed:
    """One initializer's place in the data file and where its bytes come from."""

    name: str  # ONNX initializer name
    source: str | None  # tensor name in the checkpoint (None: a value given in memory)
    shape: tuple[int, ...]
    offset: int
    length: int


def layout(entries: list[tuple[str, str | None, tuple[int, ...]]], itemsizes: dict[str, int]) -> list[Placed]:
    """Offsets for (onnx name, source name, shape) in order; `itemsizes` gives each name's bytes per element."""
    placed: list[Placed] = []
    offset = 0
    for name, source, shape in entries:
        length = math.prod(shape) * itemsizes[name]
        align = _ALIGN_BIG if length >= _ALIGN_BIG else _ALIGN_SMALL
        offset = -(-offset // align) * align
        placed.append(Placed(name, source, tuple(shape), offset, length))
        offset += length
    return placed


def _bytes(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _file(source: TensorSource, name: str) -> str | None:
    """The file a source tensor lives in (for messages), when the source can say."""
    byte_range = getattr(source, "byte_range", None)  # a computed view (fp8 dequantized) has no single file
    if byte_range is None:
        return None
    try:
        return str(byte_range(name)[0])
    except KeyError:
        return None


def write_data(path: Path, placed: list[Placed], source: TensorSource, dtype: torch.dtype,
               values: dict[str, torch.Tensor] | None = None, progress: Progress = NULL_PROGRESS) -> int:
    """Write every placed tensor's bytes in dim-0 pieces: one expert, or ~64 MiB of rows."""
    values = values or {}
    infos = source.infos()
    total = sum(p.length for p in placed)
    with open(path, "wb") as fh, progress.task("writing weights", total=total, unit="bytes") as task:
        for p in placed:
            fh.seek(p.offset)
            if p.source is None:
                fh.write(_bytes(values[p.name]))
                task.advance(p.length)
                continue
            info = infos.get(p.source)
            if info is None or tuple(info.shape) != p.shape:
                found = "missing" if info is None else f"shape {tuple(info.shape)}"
                raise CorruptFileError(f"{p.source}: {found}, expected {p.shape} from config.json",
                                       hint="the checkpoint's weights do not match its config")
            # dim-0 pieces: one expert of a fused expert tensor, row blocks of ~64 MiB otherwise
            rows = p.shape[0] if p.shape else 1
            row_bytes = p.length // rows if rows else 0
            step = 1 if len(p.shape) == 3 else max(1, PIECE_BYTES // max(row_bytes, 1))
            if not p.shape or step >= rows:
                fh.write(_bytes(cast_checked(source.load(p.source), dtype, p.source, _file(source, p.source))))
                task.advance(p.length)
                continue
            for r in range(0, rows, step):
                rows_r = source.load_slice(p.source, r if step == 1 else slice(r, min(r + step, rows)))
                piece = cast_checked(rows_r, dtype, p.source, _file(source, p.source))  # fp16: refuses > 65504
                fh.write(_bytes(piece))
                task.advance(piece.numel() * piece.element_size())
                del piece, rows_r
        end = placed[-1].offset + placed[-1].length if placed else 0
        fh.truncate(end)
    return total


def external_tensor(p: Placed, onnx_dtype: Any, base_dir: Path) -> Any:
    """An onnx_ir ExternalTensor pointing at the placed bytes (serialised as an external-data reference)."""
    import onnx_ir as ir

    return ir.ExternalTensor(DATA_FILE, p.offset, p.length, onnx_dtype, shape=ir.Shape(p.shape), name=p.name,
                             base_dir=str(base_dir))
