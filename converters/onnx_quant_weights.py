"""Fill an int4/int8 export's packed initializers (converters.onnx_qops) by quantizing while streaming.

Peak memory is one block of rows of a linear weight (~64 MiB of float32) or one expert's slice of a
fused expert tensor, plus its packed bytes: the checkpoint is never loaded whole, and onnxruntime's
quantizer never sees the fp32 model. Each piece is quantized in numpy (toolbox.tensors.onnx_nbits)
and its data, scales and zero points are written at their places in model.onnx.data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolbox.errors import BadInputError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.onnx_nbits import Quantized, quantize_rows

if TYPE_CHECKING:
    from converters.onnx_qops import QuantPlan
    from converters.onnx_weights import Placed
    from toolbox.tensors.source import TensorSource

PIECE_FLOATS = 16 * 1024**2  # float32 elements per row block of a linear weight (64 MiB)


def _rows(t: Any, name: str) -> np.ndarray:
    """A torch slice as float32 numpy, refusing Inf/NaN (a scale of NaN would poison a whole block)."""
    import torch

    a = t.to(torch.float32).numpy()
    if not np.isfinite(a).all():
        raise BadInputError(f"tensor {name} has Inf or NaN values; they cannot be quantized",
                            hint="fix the source weights")
    return a


def _expert_rows(w: Any, kind: str, start: int, stop: int, name: str) -> np.ndarray:
    """Rows [start, stop) of an expert's fc1 or fc2 as QMoE stores them (one row per output feature).

    fc1: gate_up [H, 2I] (x @ w = [gate | up]) gives rows [2I, H] with gate and up interleaved (row 2j is
    gate column j, row 2j+1 up column j); fc2: down [I, H] gives rows [H, I]. Only the rows asked for are
    converted to float32."""
    if kind == "fc2":
        return _rows(w[:, start:stop], name).T
    width = w.shape[1] // 2
    a, b = start // 2, stop // 2
    gate, up = _rows(w[:, a:b], name), _rows(w[:, width + a:width + b], name)
    return np.stack([gate, up], axis=-1).reshape(w.shape[0], 2 * (b - a)).T


def write_quant_data(path: Path, placed: list[Placed], plan: QuantPlan, source: TensorSource,
                     progress: Progress = NULL_PROGRESS) -> int:
    """Quantize every planned checkpoint tensor piece by piece into the already laid-out data file."""
    cfg = plan.config
    groups: dict[str, dict[str, Placed]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    for p in placed:
        spec = plan.specs[p.name]
        groups[spec.source][spec.part] = p
        kinds[spec.source] = spec.kind
    infos = source.infos()
    total = sum(p.length for p in placed)
    with open(path, "r+b") as fh, progress.task(f"quantizing weights (int{cfg.bits})", total=total,
                                                unit="bytes") as task:
        for name, places in groups.items():
            shape = tuple(infos[name].shape)
            kind = kinds[name]
            if kind == "linear":
                step = max(1, PIECE_FLOATS // max(shape[1], 1))
                for r in range(0, shape[0], step):
                    rows = _rows(source.load_slice(name, slice(r, min(r + step, shape[0]))), name)
                    q = quantize_rows(rows, cfg.bits, cfg.block_size, cfg.symmetric)
                    task.advance(_write_rows(fh, places, q, r, {}))
                continue
            n_rows = shape[2]  # fc1: 2I rows (gate_up is [E, H, 2I]); fc2: H rows (down is [E, I, H])
            step = max(2, (PIECE_FLOATS // max(shape[1], 1)) // 2 * 2)  # even: gate/up pairs stay together
            for e in range(shape[0]):  # one expert at a time, its rows in ~64 MiB float32 blocks
                w = source.load_slice(name, e)
                per_expert = {part: p.length // shape[0] for part, p in places.items()}
                for r in range(0, n_rows, step):
                    rows = _expert_rows(w, kind, r, min(r + step, n_rows), name)
                    q = quantize_rows(rows, cfg.bits, cfg.block_size, cfg.symmetric)
                    task.advance(_write_rows(fh, places, q, r, {k: e * v for k, v in per_expert.items()}))
                del w
    return total


def _write_rows(fh: Any, places: dict[str, Placed], q: Quantized, first_row: int, base: dict[str, int]) -> int:
    """A block of rows: each part's row size times the first row (after `base`, an expert's start) is its offset."""
    written = 0
    for part, arr in (("data", q.data), ("scales", q.scales), ("zero_points", q.zero_points)):
        if part not in places or arr is None:
            continue
        row_bytes = arr.nbytes // arr.shape[0]
        fh.seek(places[part].offset + base.get(part, 0) + first_row * row_bytes)
        fh.write(np.ascontiguousarray(arr).tobytes())
        written += arr.nbytes
    return written
