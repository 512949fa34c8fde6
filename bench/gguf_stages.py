"""Per-stage CPU rates of HF -> GGUF conversion, and the kernel-time floor they imply on this machine.

Each stage runs single-threaded on real bytes of the checkpoint and is timed in process CPU seconds
(best of a few), so the rates hold on a machine shared with other jobs, where wall times do not:
reading (preadv into a reused buffer, as the converter does), bf16 -> float32 of a transposed expert
slice (ggml's encoder's tiled copy, then the row converter) and of contiguous rows, each ggml kernel on
float32 rows, and direct-I/O writing. The floor of a type mix is
sum(elements of each type / that kernel's per-core rate) / cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERTS = "language_model.model.layers.0.feed_forward.experts.gate_up_proj"


def _best(fn: Any, reps: int = 3) -> float:
    """Fewest process-CPU seconds of `fn()` over `reps` runs."""
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return max(best, 1e-9)


def stage_rates(src: Path, kernels: tuple[str, ...] = ("Q8_0", "Q4_K", "Q6_K"), rows: int = 512,
                write_dir: Path | None = None) -> dict[str, float]:
    """Elements (or bytes, for read/write) per CPU-second of one core, per stage."""
    import torch

    from toolbox.tensors.direct_io import DirectFile
    from toolbox.tensors.gguf import ggml
    from toolbox.tensors.safetensors_source import SafetensorsSource

    torch.set_num_threads(1)
    source = SafetensorsSource(src)
    source.drop_after_read = source.reuse_buffers = True
    info = source.infos()[EXPERTS]
    width = info.shape[2] // 2
    rates: dict[str, float] = {}
    slice_bytes = info.nbytes // info.shape[0]
    source.load_slice(EXPERTS, 3)  # the pool's buffer, faulted in once per run

    def read() -> None:
        for e in (1, 2):
            source.load_slice(EXPERTS, e)

    rates["read (preadv, bytes/s)"] = 2 * slice_bytes / _best(read, reps=1)
    t = source.load_slice(EXPERTS, 0)
    gate = t[:, :width].T[:rows]  # [rows, hidden]: a transposed view, as the converter hands it to ggml
    conv = ggml._Rows(gate)
    sub = max(1, ggml.SUB_ELEMENTS // conv.n_per_row)

    def transposed() -> None:  # as ggml.quantize's tasks do: `gather` rows made contiguous, converted per `sub`
        for g in range(0, rows, conv.gather):
            block = conv.block(g, min(conv.gather, rows - g))
            for j in range(0, block.shape[0], sub):
                conv.float32_of(block[j:j + sub])

    rates["bf16 -> f32, transposed (elements/s)"] = gate.numel() / _best(transposed)
    flat = gate.contiguous()
    conv2 = ggml._Rows(flat)
    rates["bf16 -> f32, contiguous (elements/s)"] = flat.numel() / _best(
        lambda: [conv2.float32(r, min(sub, rows - r)) for r in range(0, rows, sub)])
    f32 = flat.float().numpy()
    for k in kernels:
        reps = 3 if k == "Q8_0" else 1
        rates[f"ggml {k} kernel (elements/s)"] = f32.size / _best(lambda k=k: ggml.quantize(f32, k, workers=1), reps)
    if write_dir is not None:
        path = write_dir / "stage-write.bin"
        data = memoryview(bytes(64 << 20))

        def write() -> None:
            with DirectFile(path) as f:
                for _ in range(8):
                    f.write(data)
            os.unlink(path)

        rates["write (direct I/O, bytes/s)"] = 8 * data.nbytes / _best(write, reps=1)
    source.close()
    return rates


def type_elements(src: Path, outtype: str) -> dict[str, int]:
    """Elements per ggml type in the file `corral convert --outtype outtype` writes from `src`."""
    from converters.hf_to_gguf import _typed_plan, resolve_outtype
    from toolbox.reference import resolve

    model = resolve(str(src))
    source = model.open_source()
    try:
        plan = _typed_plan(model.checkpoint, source, resolve_outtype(outtype, source), None, None)
    finally:
        source.close()
    out: dict[str, int] = {}
    for p in plan:
        n = 1
        for d in p.shape:
            n *= d
        out[p.qtype] = out.get(p.qtype, 0) + n
    return out


def kernel_floor(elements: dict[str, int], rates: dict[str, float], cores: int = 2) -> float | None:
    """Seconds of ggml kernel time alone for `elements` (type -> count) on `cores` cores; None if a rate is missing."""
    total = 0.0
    for qtype, n in elements.items():
        if qtype in ("F32", "F16", "BF16"):
            continue
        rate = rates.get(f"ggml {qtype} kernel (elements/s)")
        if rate is None:
            return None
        total += n / rate
    return total / cores


def rates_table(rates: dict[str, float]) -> str:
    rows = ["| stage (one core) | CPU rate |", "|---|---|"]
    for k, v in rates.items():
        unit = f"{v / 2**30:.2f} GiB/s" if "bytes" in k else f"{v / 1e6:.0f} M elements/s"
        rows.append(f"| {k.split(' (')[0]} | {unit} |")
    return "\n".join(rows)


def load_note() -> str:
    """The load averages, for the honest note beside the figures."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) at the end"
