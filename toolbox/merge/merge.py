"""Streaming LoRA merge: the base is read once, one row block or one expert slice at a time.

Each piece is widened to float32, every adapter's delta for it is computed from the low-rank
factors and added (weighted), and the sum is stored in the output dtype. Memory is bounded by
one expert slice plus a few 16 MiB row blocks and the adapters' factors, whatever the model size.
The report gives each merged tensor's delta norm and the share of the delta's energy that
rounding to the output dtype lost (small deltas vanish in bf16: with base std 0.02, a delta of std 1e-4
loses about a third of its energy).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions
from toolbox.errors import BadInputError
from toolbox.hf_output import finish_hf_directory
from toolbox.merge.adapter import Adapter
from toolbox.merge.plan import Contribution
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike
from toolbox.tensors.dtypes import HF_OUT_DTYPES
from toolbox.tensors.source import raw_file_source

if TYPE_CHECKING:
    import torch

    from toolbox.tensors.source import TensorInfo, TensorSource

ROW_BLOCK_BYTES = 8 * 1024**2  # float32 bytes of one row block being merged (of a 2-D tensor or an expert slice)
COPY_BLOCK_BYTES = 64 * 1024**2  # float32-equivalent bytes of one row block of an untouched tensor
LOST_WARN = 0.10  # warn when rounding loses more than this share of a tensor's delta energy
OUT_DTYPES = HF_OUT_DTYPES
FLOAT_ST = ("BF16", "F16", "F32")


@dataclass
class TensorReport:
    name: str
    adapters: list[int]
    kinds: list[str]
    delta_norm: float
    lost_share: float  # ||stored delta - intended delta||^2 / ||intended delta||^2

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapters": self.adapters, "kinds": self.kinds,
                "delta_norm": self.delta_norm, "lost_share": self.lost_share}


@dataclass
class MergeResult:
    path: Path
    tensors: int
    dtype: str
    adapters: list[dict[str, Any]]
    merged: list[TensorReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "tensors": self.tensors, "dtype": self.dtype,
                "adapters": self.adapters, "merged": [t.to_dict() for t in self.merged], "warnings": self.warnings}


def _torch_dtype(st: str) -> torch.dtype:
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[st]


def _refuse_overflow(name: str, stored: torch.Tensor, w: torch.Tensor) -> None:
    """Called when a block's cheap reduction came out non-finite: refuse the output if the merge itself made
    NaN/Inf (base block and adapter factors are finite: an overflow, e.g. a huge alpha/r or --weight, or f16).
    A reduction that merely overflowed, or a base that already held NaN/Inf, passes."""
    import torch

    if bool(torch.isfinite(stored).all()) or not bool(torch.isfinite(w).all()):
        return
    raise BadInputError(f"{name}: the merged values are not finite ({int((~torch.isfinite(stored)).sum())} NaN/Inf) "
                        "although the base and the adapters are: the delta overflows",
                        hint="check the adapter's scale (lora_alpha / r) and --weight, or use --dtype f32; "
                        "nothing was written")


class _Stats:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.delta = 0.0
        self.err = 0.0

    def store(self, delta: torch.Tensor, result: torch.Tensor | None, w: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
        """`result` (else w + delta, added into `delta` in place) cast to `dtype`, with ||delta||^2 and
        ||stored - (w + delta)||^2 accumulated (BLAS dot products of the float32 pieces)."""
        import torch

        d = delta.reshape(-1)
        self.delta += float(torch.dot(d, d))
        if result is None:
            result = delta.add_(w)  # delta is a fresh tensor; its norm is taken
        stored = result.to(dtype)
        if stored is not result:
            e = torch.sub(stored, result).reshape(-1)  # one pass: bf16 - f32 promotes to f32
            err = float(torch.dot(e, e))  # NaN/Inf when stored or result is: the finiteness check for free
            self.err += err
        else:
            err = float(stored.sum())
        if not math.isfinite(err):
            _refuse_overflow(self.name, stored, w)
        return stored

    def add(self, parts: tuple[float, float]) -> None:
        self.delta += parts[0]
        self.err += parts[1]


def _merge_low_rank(buf: torch.Tensor, factors: LowRank, w: torch.Tensor, out: torch.Tensor,
                    name: str = "") -> tuple[float, float]:
    """out = w + the weighted sum of (left @ right) * scale, computed in the float32 block `buf`; returns the
    block's (||delta||^2, ||rounding loss||^2). The block is checked finite while it is in cache (the rounding
    loss's dot product, or one sum for float32 outputs) and refused when the merge made NaN/Inf.

    The same operations in the same order as `_Stats.store` after `_combine` (PEFT's order: product,
    scale, weight, sum, add to the base), so results are bit-identical; only the buffers are reused."""
    import torch

    for i, (left, right, scale, weight) in enumerate(factors):
        d = torch.mm(left, right, out=buf) if i == 0 else left @ right
        d.mul_(scale)
        if weight != 1.0:
            d.mul_(weight)
        if i:
            buf.add_(d)
    flat = buf.view(-1)
    delta = float(torch.dot(flat, flat))
    buf.add_(w)
    out.copy_(buf)
    if out.dtype == torch.float32:
        if not math.isfinite(float(flat.sum())):
            _refuse_overflow(name, out, w)
        return delta, 0.0
    buf.sub_(out)  # what rounding to the output dtype lost
    err = float(torch.dot(flat, flat))
    if not math.isfinite(err):  # NaN/Inf in the stored block makes the loss non-finite
        _refuse_overflow(name, out, w)
    return delta, err


class _Factors:
    """The adapter factors of the tensor being merged, loaded once per tensor and dropped after it."""

    def __init__(self, adapters: list[Adapter]) -> None:
        self.adapters = adapters
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.per_expert: dict[tuple[int, int], torch.Tensor] = {}

    def memo(self, key: tuple[int, int], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A per-expert value (DoRA part, replacement slice), kept until `forget()` at the end of the expert."""
        if key not in self.per_expert:
            self.per_expert[key] = make()
        return self.per_expert[key]

    def forget(self) -> None:
        self.per_expert.clear()

    def get(self, c: Contribution, key: str | None) -> torch.Tensor:
        assert key is not None
        k = (c.adapter, key)
        if k not in self.cache:
            self.cache[k] = self.adapters[c.adapter].load(key)
        return self.cache[k]


def _absolute(c: Contribution, w: torch.Tensor, rows: slice, f: _Factors) -> torch.Tensor | None:
    """The merged rows for a contribution that defines the result rather than a delta (replacement, DoRA)."""
    import torch

    if c.kind == "replace":
        return f.adapters[c.adapter].load_rows(c.key, rows.start, rows.stop) if w.dim() else f.get(c, c.key)
    if c.kind == "linear" and c.m_key is not None:
        delta = (f.get(c, c.b_key)[rows] @ f.get(c, c.a_key)).mul_(c.scale)
        merged = w + delta
        norm = torch.linalg.norm(merged, dim=1)
        return (f.get(c, c.m_key)[rows] / norm).view(-1, 1) * merged
    return None


def _delta_2d(c: Contribution, w: torch.Tensor, rows: slice, f: _Factors) -> torch.Tensor:
    if c.kind == "linear" and c.m_key is None:
        return (f.get(c, c.b_key)[rows] @ f.get(c, c.a_key)).mul_(c.scale)
    if c.kind == "embedding":
        return (f.get(c, c.b_key) @ f.get(c, c.a_key)[:, rows]).T * c.scale
    absolute = _absolute(c, w, rows, f)
    assert absolute is not None, c.kind
    return absolute - w


def _delta_expert(c: Contribution, w: torch.Tensor, e: int, rows: slice, slab: torch.Tensor,
                  f: _Factors) -> torch.Tensor | None:
    """This contribution's delta to rows `rows` (w) of expert e's slice `slab` ([in, out] as stored), or None."""
    import torch

    if c.kind == "experts":
        r, n = c.rank, c.experts
        a = f.get(c, c.a_key)[e * r:(e + 1) * r]
        b = f.get(c, c.b_key)[:, e::n]
        if c.layout == "current":  # delta[e] = B_e @ A_e, rows of the stored slice are rows of B_e
            return (b[rows] @ a).mul_(c.scale)
        return (b @ a[:, rows]).T * c.scale  # legacy: delta[e] = (B_e @ A_e).T
    if c.kind == "expert_part":
        if c.expert != e:
            return None
        half = slab.shape[1] // 2
        cols = {"gate": slice(0, half), "up": slice(half, None), "down": slice(None)}[c.part or "down"]
        if c.m_key is not None:  # DoRA needs whole rows of the [out, in] weight: the expert's full part, once
            d = f.memo((id(c), e), lambda: _dora_part(c, slab[:, cols].float().T, f))[:, rows]
        else:
            d = (f.get(c, c.b_key) @ f.get(c, c.a_key)[:, rows]).mul_(c.scale)  # [out, rows of in]
        full = torch.zeros(w.shape, dtype=torch.float32)
        full[:, cols] = d.T
        return full
    if c.kind == "replace":
        return f.memo((id(c), e), lambda: f.adapters[c.adapter].load_rows(c.key, e, e + 1)[0])[rows] - w
    raise AssertionError(c.kind)


def _dora_part(c: Contribution, part: torch.Tensor, f: _Factors) -> torch.Tensor:
    import torch

    merged = part + (f.get(c, c.b_key) @ f.get(c, c.a_key)) * c.scale
    return (f.get(c, c.m_key) / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged - part


def _combine(contribs: list[Contribution], w: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    import torch

    total = None
    for c, d in zip(contribs, deltas, strict=True):
        d = d if c.weight == 1.0 else d * c.weight
        total = d if total is None else total + d
    return total if total is not None else w.new_zeros(w.shape, dtype=torch.float32)


class TensorMerge:
    """The merge of one base tensor, piece by piece (a small tensor, a row block, an expert slice): what
    `merge_adapters` writes and what `toolbox.merge.merged_source.MergedSource` serves to a converter, so the
    two give the same bytes. Each piece's delta statistics go into the `_Stats` the caller passes."""

    def __init__(self, info: TensorInfo, out_st: str, contribs: list[Contribution], f: _Factors) -> None:
        self.info, self.contribs, self.f = info, contribs, f
        self.dt = _torch_dtype(out_st)
        self.step = _rows_per_block(info.shape[2] if len(info.shape) == 3 else math.prod(info.shape[1:]))
        self._local = threading.local()
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    def small(self, w: torch.Tensor, stats: _Stats) -> torch.Tensor:
        """The merged tensor of fewer than two dimensions (`w`: the base's)."""
        w = w.float()
        rows = slice(0, self.info.shape[0] if self.info.shape else 1)
        sole = _sole_absolute(self.contribs, w, rows, self.f)
        delta = sole - w if sole is not None else _combine(self.contribs, w,
                                                           [_delta_2d_1d(c, w, self.f) for c in self.contribs])
        return stats.store(delta, sole, w, self.dt)

    def rows(self, w: torch.Tensor, r0: int, stats: _Stats) -> torch.Tensor:
        """The merged rows r0:r0+len(w) of a 2-D tensor, `w` the base's rows (at most `step` of them); the result
        may be a buffer the next call reuses."""
        import torch

        rows = slice(r0, r0 + w.shape[0])
        factors = _low_rank(self.contribs, [_linear_factors(c, rows, self.f) for c in self.contribs]) \
            if w.dim() == 2 else None
        if factors is not None:
            if self._bufs is None:  # reused across row blocks
                self._bufs = (torch.empty((self.step, self.info.shape[1]), dtype=torch.float32),
                              torch.empty((self.step, self.info.shape[1]), dtype=self.dt))
            buf, out = self._bufs
            n = w.shape[0]
            stats.add(_merge_low_rank(buf[:n], factors, w, out[:n], self.info.name))
            return out[:n]
        w = w.float()
        sole = _sole_absolute(self.contribs, w, rows, self.f)
        delta = sole - w if sole is not None else _combine(self.contribs, w,
                                                           [_delta_2d(c, w, rows, self.f) for c in self.contribs])
        return stats.store(delta, sole, w, self.dt)

    def _low_rank_block(self, e: int, r0: int, slab: torch.Tensor, out: torch.Tensor) -> tuple[float, float] | None:
        import torch

        info, step = self.info, self.step
        rows = slice(r0, min(r0 + step, info.shape[1]))
        factors = _low_rank(self.contribs, [_expert_factors(c, e, rows, self.f) for c in self.contribs])
        if factors is None:
            return None
        if not hasattr(self._local, "buf"):  # one float32 block per worker, reused (fresh MiBs fault in every time)
            self._local.buf = torch.empty((step, info.shape[2]), dtype=torch.float32)
        return _merge_low_rank(self._local.buf[:rows.stop - r0], factors, slab[rows], out[rows], info.name)

    def expert(self, e: int, slab: torch.Tensor, out: torch.Tensor, pool: ThreadPoolExecutor, stats: _Stats) -> None:
        """Expert e's merged slice of a fused expert tensor into `out` (`slab`: the base's), its row blocks
        computed by `pool`'s workers (torch single-threaded meanwhile, see `_pipelined`)."""
        f, step, n_rows = self.f, self.step, self.info.shape[1]
        starts = range(0, n_rows, step)
        for c in self.contribs:  # the factors are loaded here, once, not raced for by the workers
            _expert_factors(c, e, slice(0, 1), f)
        parts = list(pool.map(lambda r0: self._low_rank_block(e, r0, slab, out), starts))
        for r0, part in zip(starts, parts, strict=True):  # summed in row order: the report is deterministic
            if part is not None:
                stats.add(part)
                continue
            rows = slice(r0, min(r0 + step, n_rows))
            w = slab[rows]  # the base dtype: adding it into a float32 delta widens it exactly, in one pass
            pieces = [(c, _delta_expert(c, w, e, rows, slab, f)) for c in self.contribs]
            live = [(c, d) for c, d in pieces if d is not None]
            out[rows] = stats.store(_combine([c for c, _ in live], w, [d for _, d in live]), None, w, self.dt)
        f.forget()


def _merge_tensor(source: TensorSource, writer: Any, info: TensorInfo, out_st: str, contribs: list[Contribution],
                  f: _Factors) -> _Stats:
    """Write one output tensor, merged piece by piece; return its delta statistics."""
    m = TensorMerge(info, out_st, contribs, f)
    name = info.name
    stats = _Stats(name)
    if len(info.shape) == 3:  # one expert slice at a time, merged in row blocks of it
        _pipelined(source, writer, info, m.dt, lambda e, slab, out, pool: m.expert(e, slab, out, pool, stats))
        return stats
    if len(info.shape) < 2:
        writer.write(name, m.small(source.load(name), stats))
        return stats
    for r0 in range(0, info.shape[0], m.step):
        w = source.load_slice(name, slice(r0, min(r0 + m.step, info.shape[0])))
        writer.write(name, m.rows(w, r0, stats))
    return stats


def _pipelined(source: TensorSource, writer: Any, info: TensorInfo, dt: torch.dtype,
               merge_expert: Callable[[int, torch.Tensor, torch.Tensor, ThreadPoolExecutor], None]) -> None:
    """Merge a fused expert tensor slice by slice, with the next slice read and the previous one written
    by two I/O threads while this one is computed (reads and writes release the GIL; on a model larger
    than memory they wait on the disk, which then stays busy while the CPU merges). Row blocks of a slice
    are computed by one single-threaded worker per core, taking blocks as they free up (torch's own
    threads split every small operation in lock step and wait for the slowest). At most two input and
    two output slices are alive: memory stays bounded by the slice size."""
    import torch

    from toolbox.tensors.sink import tensor_bytes

    name, n = info.name, info.shape[0]
    outs = [torch.empty(info.shape[1:], dtype=dt) for _ in range(min(n, 2))]
    writes: list[Future[None]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(1, thread_name_prefix="corral-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="corral-write") as writing, \
            ThreadPoolExecutor(max(1, threads), thread_name_prefix="corral-merge") as compute:
        try:
            ahead = reader.submit(source.load_slice, name, 0)
            for e in range(n):
                slab = ahead.result()
                if e + 1 < n:
                    ahead = reader.submit(source.load_slice, name, e + 1)
                if e >= 2:
                    writes[e - 2].result()  # its output buffer is reused now
                out = outs[e % 2]
                merge_expert(e, slab, out, compute)
                del slab
                writes.append(writing.submit(writer.write_bytes, name, tensor_bytes(out)))
            for w in writes:
                w.result()
        except BaseException:
            for w in writes:
                w.cancel()
            raise
        finally:
            torch.set_num_threads(threads)


LowRank = list[tuple["torch.Tensor", "torch.Tensor", float, float]]  # (left rows, right, scale, weight)


def _low_rank(contribs: list[Contribution], pairs: list[tuple[Any, Any] | None]) -> LowRank | None:
    """Each contribution's delta to a row block as (left @ right) * scale * weight, or None when one of them
    is not a plain low-rank product (DoRA, replacement, embedding, the legacy expert layout)."""
    if any(p is None for p in pairs):
        return None
    return [(p[0], p[1], c.scale, c.weight) for c, p in zip(contribs, pairs, strict=True) if p is not None]


def _linear_factors(c: Contribution, rows: slice, f: _Factors) -> tuple[Any, Any] | None:
    if c.kind == "linear" and c.m_key is None:
        return f.get(c, c.b_key)[rows], f.get(c, c.a_key)
    return None


def _expert_factors(c: Contribution, e: int, rows: slice, f: _Factors) -> tuple[Any, Any] | None:
    if c.kind == "experts" and c.layout == "current":  # delta[e] = B_e @ A_e, rows of the slice are rows of B_e
        r, n = c.rank, c.experts
        return f.get(c, c.b_key)[:, e::n][rows], f.get(c, c.a_key)[e * r:(e + 1) * r]
    return None


def _rows_per_block(row_numel: int) -> int:
    return max(1, ROW_BLOCK_BYTES // max(4 * row_numel, 1))


def _delta_2d_1d(c: Contribution, w: torch.Tensor, f: _Factors) -> torch.Tensor:
    if c.kind != "replace":
        raise AssertionError(c.kind)
    return f.get(c, c.key) - w


def _sole_absolute(contribs: list[Contribution], w: torch.Tensor, rows: slice, f: _Factors) -> torch.Tensor | None:
    """A single unweighted replacement or DoRA contribution is written as PEFT computes it, not as base + delta."""
    if len(contribs) != 1 or contribs[0].weight != 1.0:
        return None
    c = contribs[0]
    if c.kind == "replace" and w.dim() < 2:
        return f.get(c, c.key)
    return _absolute(c, w, rows, f)


def _copy_tensor(source: TensorSource, writer: Any, info: TensorInfo, out_st: str) -> None:
    """Stream an untouched tensor through, converting only when the output dtype differs."""
    dt = _torch_dtype(out_st) if out_st in FLOAT_ST else None
    name = info.name
    raw = raw_file_source(source, name) if out_st == info.dtype else None
    if raw is not None and hasattr(writer, "copy_range"):  # stored as it will be written: copied in the kernel
        writer.copy_range(name, *raw.byte_range(name))
        return
    if len(info.shape) == 3:
        for e in range(info.shape[0]):
            t = source.load_slice(name, e)
            writer.write(name, t.to(dt) if dt is not None and t.dtype != dt else t)
            del t
        return
    if len(info.shape) < 2:
        t = source.load(name)
        writer.write(name, t.to(dt) if dt is not None and t.dtype != dt else t)
        return
    step = max(1, COPY_BLOCK_BYTES // max(4 * math.prod(info.shape[1:]), 1))
    for r0 in range(0, info.shape[0], step):
        t = source.load_slice(name, slice(r0, min(r0 + step, info.shape[0])))
        writer.write(name, t.to(dt) if dt is not None and t.dtype != dt else t)


def _out_dtype(info_dtype: str, requested: str | None) -> str:
    return requested if requested and info_dtype in FLOAT_ST else info_dtype


def _output_config(config: dict[str, Any], requested: str | None) -> dict[str, Any]:
    cfg = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)  # FP8 bases are dequantized on read; the output is plain floats
    if requested:
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[requested]
        for part in (cfg, cfg.get("text_config"), cfg.get("vision_config")):
            if isinstance(part, dict) and ("dtype" in part or part is cfg):
                part["dtype"] = name
                part.pop("torch_dtype", None)
    return cfg


def merge_adapters(base: ModelLike, adapters: list[str | Path | Adapter], out: str | Path, *,
                   weights: list[float] | None = None, dtype: str | None = None, force: bool = False,
                   license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                   shards: Collection[int] | None = None, max_shard_bytes: int | None = None,
                   **legacy: Any) -> MergeResult:
    """Merge LoRA adapters into an HF Llama 4 checkpoint (any layout corral reads), streamed and stamped.

    `weights` scale each adapter's delta (default 1 each); `dtype` is auto/bf16/f16/f32 (auto keeps
    the base's). `license_options` (or name=, mau_declaration=, fix_name=, base_model=): `base_model` is the
    base's Hub repo id for the model card (else taken from a `corral download` manifest or the adapter
    config). Every adapter key must land on a base
    tensor; the output directory appears only once complete. `max_shard_bytes` sizes the safetensors files
    (default 5 GiB); `shards` (0-based, of `merge_shard_count`) writes only those files, byte for byte as the
    whole run does, reading and merging nothing else (the report lists their tensors only); `shards=()` writes
    the rest of the directory (config, tokenizer, license files, index).
    """
    from toolbox.merge.prepare import check_merge_args, prepare_merge
    from toolbox.tensors.atomic import atomic_directory, check_output_path, ensure_free_space
    from toolbox.tensors.sink import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter
    from toolbox.tensors.source import TensorInfo

    opts = LicenseOptions.of(license_options, **legacy)
    weights, key, requested = check_merge_args(adapters, weights, dtype)
    out = Path(out).absolute()
    check_output_path(out, force=force)
    prep = prepare_merge(base, adapters, weights=weights, key=key, requested=requested, opts=opts, progress=progress)
    source, plan, stamp, loaded, ckpt = prep.source, prep.plan, prep.stamp, prep.loaded, prep.ckpt
    try:
        infos = source.infos()
        result = MergeResult(out, len(infos), requested or "auto", prep.described, name=stamp.name)
        with atomic_directory(out, force=force) as staging:
            writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata(), shards=shards,
                                       max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
            for info in infos.values():
                writer.add(info.name, info.shape, _out_dtype(info.dtype, requested))
            writer.begin()
            todo = [i for i in infos.values() if writer.wanted(i.name)]
            ensure_free_space(out, sum(TensorInfo(i.name, i.shape, _out_dtype(i.dtype, requested)).nbytes
                                       for i in todo), f"the merged checkpoint {out.name}")
            with progress.task("merging", total=sum(i.nbytes for i in todo), unit="bytes") as task:
                for info in todo:
                    out_st = _out_dtype(info.dtype, requested)
                    contribs = plan.by_base.get(info.name)
                    if contribs:
                        stats = _merge_tensor(source, writer, info, out_st, contribs, _Factors(loaded))
                        result.merged.append(tensor_report(info.name, contribs, stats.delta, stats.err))
                    else:
                        _copy_tensor(source, writer, info, out_st)
                    task.advance(info.nbytes)
            writer.finish()
            result.warnings.extend(lossy_warnings(result.merged))
            if writer.writes_rest:
                finish_hf_directory(staging, prep.model.path, _output_config(ckpt.config, requested), stamp)
    finally:
        prep.close()
    return result


def merge_shard_count(base: ModelLike, *, dtype: str | None = None, max_shard_bytes: int | None = None) -> int:
    """How many safetensors files `merge_adapters`, or a weight merge of this base (`merge_weights`), writes, from
    its headers alone (either output has the base's tensors, in the output dtype): what a caller writing each
    shard in its own process needs first."""
    from toolbox.merge.prepare import check_merge_args
    from toolbox.reference import resolve
    from toolbox.tensors.sink import DEFAULT_MAX_SHARD_BYTES, shard_count
    from toolbox.tensors.source import TensorInfo

    requested = check_merge_args(["-"], None, dtype)[2]
    source = resolve(base).open_source()
    try:
        sizes = [TensorInfo(i.name, i.shape, _out_dtype(i.dtype, requested)).nbytes for i in source.infos().values()]
    finally:
        source.close()
    return shard_count(sizes, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)


def tensor_report(name: str, contribs: list[Contribution], delta: float, err: float) -> TensorReport:
    """A merged tensor's line of the report, from its summed ||delta||^2 and ||rounding loss||^2."""
    return TensorReport(name, [c.adapter for c in contribs], [c.kind for c in contribs], math.sqrt(delta),
                        err / delta if delta > 0 else 0.0)


def lossy_warnings(merged: list[TensorReport]) -> list[str]:
    """The warning when rounding to the output dtype lost much of some tensors' deltas (none otherwise)."""
    lossy = sorted((t for t in merged if t.lost_share > LOST_WARN), key=lambda t: -t.lost_share)
    if not lossy:
        return []
    return [f"{len(lossy)} of {len(merged)} merged tensors lose more than {LOST_WARN:.0%} of their "
            f"delta's energy to rounding (worst: {lossy[0].name}, {lossy[0].lost_share:.0%}); --dtype f32 keeps it"]
