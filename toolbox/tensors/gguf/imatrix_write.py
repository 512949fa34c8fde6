"""Importance matrices as raw sums: accumulated, combined and written in llama.cpp's GGUF imatrix format.

The file `llama-imatrix` writes (tools/imatrix/imatrix.cpp `save_imatrix`): general.type = "imatrix",
imatrix.datasets (array of strings), imatrix.chunk_count and imatrix.chunk_size (u32), and per weight two
F32 tensors, `<weight>.in_sum2` (ne = [ne0, n_mat]: the summed squares of each input column, one row per
expert of a 3-D `*_exps` weight) and `<weight>.counts` (ne = [1, n_mat]: tokens per expert), in sorted name
order. `--in-file` combination (imatrix.cpp `load_imatrix`) adds raw sums and counts; a legacy `.dat` entry
holds (sum / count) * ncall and counts {ncall}, so it is rebuilt as sums * chunk_size and ncall * chunk_size;
a one-count entry meeting a per-expert one is broadcast to every expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np

    from toolbox.tensors.gguf.imatrix import ImatrixFile


@dataclass
class ImatrixSums:
    """Raw statistics: per weight, sums [n_mat, ne0] (float64 while accumulating) and counts [n_mat] (int64)."""

    chunk_size: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    def entry(self, name: str, n_mat: int, ne0: int) -> tuple[np.ndarray, np.ndarray]:
        """The (sums, counts) arrays of `name`, created as zeros on first use."""
        import numpy as np

        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, ne0), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        return self.sums[name], self.counts[name]

    def merge(self, other: ImatrixSums, *, what: str = "an --in-file") -> None:
        """Add `other`'s sums and counts (llama-imatrix --in-file); BadInputError for a shape that differs."""
        import numpy as np

        for name, s in other.sums.items():
            c = other.counts[name]
            if name not in self.sums:
                self.sums[name], self.counts[name] = s.astype(np.float64).copy(), c.copy()
                continue
            mine, mc = self.sums[name], self.counts[name]
            if mine.size != s.size:
                raise BadInputError(f"{what}: imatrix entry {name} has {s.size} values, not {mine.size}",
                                    hint="combine files made for the same model")
            if mc.size == 1 and c.size > 1:  # broadcast a dense count onto experts, as llama-imatrix does
                mc = np.repeat(mc, c.size)
                mine = mine.reshape(c.size, -1)
            elif c.size == 1 and mc.size > 1:
                c = np.repeat(c, mc.size)
            if mc.size != c.size:
                raise BadInputError(f"{what}: imatrix entry {name} has {c.size} counts, not {mc.size}",
                                    hint="combine files made for the same model")
            self.sums[name] = mine + s.reshape(mine.shape)
            self.counts[name] = mc + c
        self.datasets.extend(other.datasets)
        top = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        self.chunk_count = top // self.chunk_size if self.chunk_size else 0


def raw_sums(imat: ImatrixFile, chunk_size: int) -> ImatrixSums:
    """A loaded imatrix file as raw sums, as llama-imatrix reads an --in-file (entries read one at a time)."""
    import numpy as np

    out = ImatrixSums(chunk_size, datasets=list(imat.datasets))
    for name in imat.names():
        e = imat.entries[name]
        with open(imat.path, "rb") as f:
            sums = np.fromfile(f, dtype="<f4", count=e.nval, offset=e.offset).astype(np.float64)
        if sums.size != e.nval:
            raise BadInputError(f"{imat.path}: entry {name!r} runs past the end of the file", path=imat.path)
        counts = np.array(e.counts, dtype=np.int64)
        if imat.legacy:
            sums *= chunk_size
            counts *= chunk_size
        out.sums[name] = sums.reshape(counts.size if not imat.legacy else 1, -1)
        out.counts[name] = counts
    return out


def write_imatrix_gguf(path: str | Path, data: ImatrixSums, *, decorate: Callable[[Any], None] | None = None) -> int:
    """Write `data` to `path` (the caller's partial) in llama-imatrix's GGUF layout; `decorate(writer)` adds
    more keys (a license stamp) before the header. Returns the entries written."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="")
    # llama-imatrix writes no general.architecture; gguf-py always adds it, so drop it again
    for kv in w.kv_data:
        kv.pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(data.datasets))
    w.add_uint32("imatrix.chunk_count", int(data.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(data.chunk_size))
    if decorate is not None:
        decorate(w)
    names = sorted(data.sums)
    for name in names:
        s, c = data.sums[name], data.counts[name]
        if not np.isfinite(s).all():
            raise BadInputError(f"{path}: imatrix entry {name} holds non-finite sums",
                                hint="the model produced NaN/Inf activations on the calibration text")
        # ggml writes a tensor with its trailing dimensions of 1 dropped: a dense weight's entry is 1-D
        shape = (c.size, -1) if c.size > 1 else (-1,)
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(s.reshape(shape), dtype=np.float32))
        w.add_tensor(f"{name}.counts", c.astype(np.float32).reshape((c.size, 1) if c.size > 1 else (1,)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(names)


def entries_from(items: Iterable[tuple[str, np.ndarray, np.ndarray]], chunk_size: int) -> ImatrixSums:
    """ImatrixSums from (name, sums [n_mat, ne0], counts [n_mat]) triples (tests, scripts)."""
    import numpy as np

    out = ImatrixSums(chunk_size)
    for name, s, c in items:
        out.sums[name] = np.asarray(s, dtype=np.float64)
        out.counts[name] = np.asarray(c, dtype=np.int64).reshape(-1)
    return out
