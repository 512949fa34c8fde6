"""A LoRA merge as a tensor source: the base's canonical tensors, each piece merged when it is read.

A converter reading it (`corral merge --to gguf`) gets the merged model without a merged copy on disk.
Each piece is computed by `toolbox.merge.merge.TensorMerge`, the code `merge_adapters` writes with, on
the same row blocks and expert slices, so the bytes equal those of the HF checkpoint it would write.
Memory: one expert slice (plus a float32 row block per core) or one row block, and the adapters' factors
of the tensor being read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.merge.merge import (
    FLOAT_ST,
    TensorMerge,
    TensorReport,
    _Factors,
    _out_dtype,
    _Stats,
    _torch_dtype,
    tensor_report,
)
from toolbox.tensors.source import SourceView, TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

    from license.stamp import LicenseOptions
    from toolbox.merge.adapter import Adapter
    from toolbox.merge.prepare import PreparedMerge
    from toolbox.progress import Progress
    from toolbox.reference import ModelLike


class MergedSource(SourceView):
    """The merged checkpoint's tensors, in the output dtype, computed per piece; `metadata` is the stamp the
    merged checkpoint would carry, so an output made from it inherits the merge's history."""

    def __init__(self, prep: PreparedMerge) -> None:
        self.prep = prep
        self.inner = prep.source
        self.path = prep.source.path
        self._base = prep.source.infos()
        self._infos = {n: TensorInfo(n, i.shape, _out_dtype(i.dtype, prep.requested)) for n, i in self._base.items()}
        self._current: tuple[str, TensorMerge] | None = None  # the tensor being read, with its adapter factors
        self._parts: dict[str, dict[int, tuple[float, float]]] = {}  # name -> piece -> (||delta||^2, ||loss||^2)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def metadata(self) -> dict[str, str]:
        return self.prep.stamp.safetensors_metadata()

    def stored(self) -> TensorSource:
        return self  # the merged bytes are stored nowhere: no reader may copy the base's bytes in their place

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        import torch

        shape = self._infos[name].shape
        if len(shape) == 3:
            return torch.stack([self.load_slice(name, e) for e in range(shape[0])])
        if len(shape) == 2:
            return self.load_slice(name, slice(0, shape[0]))
        m = self._merge_of(name)
        if m is None:
            return self._cast(name, self.inner.load(name))
        stats = _Stats(name)
        t = m.small(self.inner.load(name), stats)
        self._record(name, 0, stats)
        return t

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        shape = self._infos[name].shape
        m = self._merge_of(name)
        if m is None:
            return self._cast(name, self.inner.load_slice(name, index))
        if len(shape) < 2:
            return self.load(name)[index]
        if len(shape) == 3:
            if isinstance(index, int):
                return self._expert(m, name, index % shape[0])
            return torch.stack([self._expert(m, name, e) for e in range(*index.indices(shape[0]))])
        if isinstance(index, int):
            return self._rows(m, name, slice(index % shape[0], index % shape[0] + 1))[0]
        start, stop, stride = index.indices(shape[0])
        if stride != 1:
            return self._rows(m, name, slice(0, shape[0]))[index]
        return self._rows(m, name, slice(start, max(start, stop)))

    def _rows(self, m: TensorMerge, name: str, rows: slice) -> torch.Tensor:
        """Rows of a merged 2-D tensor, computed on merge_adapters' row blocks (aligned to 0, `m.step` rows):
        a block the request cuts is computed whole and cut, so every row comes out as merge_adapters writes it."""
        import torch

        n_rows = self._infos[name].shape[0]
        out = torch.empty((rows.stop - rows.start, *self._infos[name].shape[1:]), dtype=m.dt)
        for r0 in range(rows.start // m.step * m.step, rows.stop, m.step):
            r1 = min(r0 + m.step, n_rows)
            stats = _Stats(name)
            merged = m.rows(self.inner.load_slice(name, slice(r0, r1)), r0, stats)
            self._record(name, r0, stats)
            lo, hi = max(rows.start, r0), min(rows.stop, r1)
            out[lo - rows.start:hi - rows.start] = merged[lo - r0:hi - r0]
        return out

    def _expert(self, m: TensorMerge, name: str, e: int) -> torch.Tensor:
        """Expert e's merged slice, its row blocks on one single-threaded worker per core, as merge_adapters."""
        import torch

        slab = self.inner.load_slice(name, e)
        out = torch.empty(self._infos[name].shape[1:], dtype=m.dt)
        threads = torch.get_num_threads()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="corral-merge")
        stats = _Stats(name)
        torch.set_num_threads(1)
        try:
            m.expert(e, slab, out, self._pool, stats)
        finally:
            torch.set_num_threads(threads)
        self._record(name, e, stats)
        return out

    def _merge_of(self, name: str) -> TensorMerge | None:
        """The merge of `name` (None for a tensor no adapter touches); the previous tensor's factors are dropped."""
        contribs = self.prep.plan.by_base.get(name)
        if not contribs:
            return None
        if self._current is None or self._current[0] != name:
            self._current = (name, TensorMerge(self._base[name], self._infos[name].dtype, contribs,
                                               _Factors(self.prep.loaded)))
        return self._current[1]

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An untouched tensor in the output dtype, as merge_adapters copies it."""
        st = self._infos[name].dtype
        if st not in FLOAT_ST:
            return t
        dt = _torch_dtype(st)
        return t.to(dt) if t.dtype != dt else t

    def _record(self, name: str, piece: int, stats: _Stats) -> None:
        self._parts.setdefault(name, {}).setdefault(piece, (stats.delta, stats.err))  # a piece read twice counts once

    def reports(self) -> list[TensorReport]:
        """Each merged tensor that was read: its delta norm and rounding loss, pieces summed in order."""
        out = []
        for name, contribs in self.prep.plan.by_base.items():
            parts = self._parts.get(name)
            if parts:
                pieces = [parts[k] for k in sorted(parts)]
                out.append(tensor_report(name, contribs, sum(p[0] for p in pieces), sum(p[1] for p in pieces)))
        return out

    def unread(self) -> list[str]:
        """Merged tensors no reader asked for (the vision tower of a text-only GGUF)."""
        return [n for n in self.prep.plan.by_base if n not in self._parts]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        self.prep.close()


def open_merged(base: ModelLike, adapters: list[str | Path | Adapter], *, weights: list[float] | None = None,
                dtype: str | None = None, license_options: LicenseOptions | None = None,
                progress: Progress | None = None) -> MergedSource:
    """The merge of `adapters` into `base` as a source (checked, planned and stamped as `merge_adapters` does:
    bad input fails here, before anything is written); the caller closes it."""
    from license.stamp import LicenseOptions
    from toolbox.merge.prepare import check_merge_args, prepare_merge
    from toolbox.progress import NULL_PROGRESS

    weights_, key, requested = check_merge_args(adapters, weights, dtype)
    prep = prepare_merge(base, adapters, weights=weights_, key=key, requested=requested,
                         opts=license_options or LicenseOptions(), progress=progress or NULL_PROGRESS)
    return MergedSource(prep)


def merged_config(source: MergedSource) -> dict[str, Any]:
    """The config.json the merged checkpoint would have."""
    from toolbox.merge.merge import _output_config

    return _output_config(source.prep.ckpt.config, source.prep.requested)
