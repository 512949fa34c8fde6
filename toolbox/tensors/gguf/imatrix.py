"""Importance matrices as llama.cpp's quantizer reads them: the GGUF imatrix format and the legacy `.dat`.

GGUF format (llama-imatrix's default output): per weight `<tensor>.in_sum2` (F32, `ne0 x n_mat`: the
sums of squared activations, one row per expert of a 3-D `*_exps` tensor) and `<tensor>.counts` (F32,
`n_mat`: the tokens each expert saw), plus the keys imatrix.datasets / imatrix.chunk_count /
imatrix.chunk_size. Legacy format: int32 entry count, then per entry int32 name length, name, int32
ncall, int32 nval and nval float32, then an optional int32 chunk count and dataset name.

`ImatrixFile.weights(name)` is the float array llama-quantize passes to `ggml_quantize_chunk`
(tools/quantize/quantize.cpp `load_imatrix`): GGUF sums divided by each expert's rounded count (1.0 for
an expert that saw no token); legacy sums divided by ncall. The file comes from strangers: every count,
length and offset is checked against the file size and fixed limits before anything is read, values
are memory-mapped and normalised one entry at a time, and non-finite weights are refused up front, as
llama.cpp refuses them.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, CorruptFileError, UsageError

if TYPE_CHECKING:
    import numpy as np

MAX_ENTRIES = 1 << 16  # Maverick has ~200 weights; 65,536 is no model's imatrix
MAX_VALUES = 1 << 28  # floats in one entry (1 GiB): 16x Maverick's largest expert tensor row set
MAX_NAME = 1024  # bytes of one legacy entry name (llama.cpp's tensor names stay under 64)
MAX_PATTERNS = 64  # --include-weights / --exclude-weights given
_HINT = "make it again with llama-imatrix (or pass another --imatrix file)"
_SUFFIXES = (".in_sum2", ".counts")


@dataclass
class _Entry:
    offset: int  # byte offset of the float32 sums in the file
    nval: int
    counts: list[int]  # GGUF: per expert, rounded as llama.cpp rounds them; legacy: [ncall]


@dataclass
class ImatrixFile:
    """An importance matrix file's entries (lazy), its datasets and chunk count."""

    path: Path
    legacy: bool
    entries: dict[str, _Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    def names(self) -> list[str]:
        return sorted(self.entries)

    def size(self, name: str) -> int:
        """Values of entry `name` (ne0 * experts)."""
        return self.entries[name].nval

    def weights(self, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """The normalised importance weights of tensor `name` (float32, ne0 * experts), as llama-quantize has
        them; `first`/`count` read only that range (one expert's row of a 3-D tensor)."""
        import numpy as np

        e = self.entries[name]
        count = e.nval - first if count is None else count
        if first < 0 or count < 0 or first + count > e.nval:
            raise BadInputError(f"{self.path}: entry {name!r} has {e.nval} values, not {first}+{count}", path=self.path)
        with open(self.path, "rb") as f:
            sums = np.fromfile(f, dtype="<f4", count=count, offset=e.offset + 4 * first).astype(np.float32)
        if sums.size != count:
            raise CorruptFileError(f"{self.path}: entry {name!r} runs past the end of the file: truncated",
                                   hint=_HINT, path=self.path)
        if self.legacy:
            ncall = e.counts[0]
            return sums / np.float32(ncall) if ncall > 0 else sums
        ne0 = e.nval // len(e.counts)
        expert = (np.arange(first, first + count) // ne0).astype(np.int64)
        counts = np.array(e.counts, dtype=np.float32)[expert]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, sums / np.where(counts > 0, counts, np.float32(1)), np.float32(1))
        return out.astype(np.float32)

    def select(self, include: list[str] | None = None, exclude: list[str] | None = None) -> ImatrixFile:
        """llama-quantize's --exclude-weights / --include-weights: drop (or keep only) entries whose name
        contains one of the strings; the two cannot be combined."""
        include, exclude = include or [], exclude or []
        if include and exclude:
            raise UsageError("--include-weights and --exclude-weights cannot be used together")
        if len(include) + len(exclude) > MAX_PATTERNS:
            raise UsageError(f"at most {MAX_PATTERNS} --include-weights/--exclude-weights")
        kept = {n: e for n, e in self.entries.items() if not any(s in n for s in exclude)}
        if include:
            kept = {n: e for n, e in kept.items() if any(s in n for s in include)}
        return ImatrixFile(self.path, self.legacy, kept, list(self.datasets), self.chunk_count)

    def check_finite(self) -> None:
        """BadInputError naming the first entry with a NaN or Inf weight (llama.cpp refuses those too)."""
        import numpy as np

        for name in self.names():
            if not np.isfinite(self.weights(name)).all():
                raise BadInputError(f"{self.path}: importance matrix entry {name!r} holds non-finite values",
                                    hint=_HINT, path=self.path)


def load_imatrix(path: str | Path) -> ImatrixFile:
    """Read and check an imatrix file (GGUF or legacy, told apart by the magic); CorruptFileError (exit 3)
    naming the file and what is wrong, BadInputError for a missing file or non-finite weights."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such imatrix file", path=p)
    with open(p, "rb") as f:
        magic = f.read(4)
    out = _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)
    if not out.entries:
        raise CorruptFileError(f"{p}: the importance matrix has no entries", hint=_HINT, path=p)
    out.check_finite()
    return out


def _load_gguf(p: Path) -> ImatrixFile:
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(p)
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in g.fields:
            raise CorruptFileError(f"{p}: imatrix metadata key {key} is missing (llama-quantize refuses it too)",
                                   hint=_HINT, path=p)
    datasets = g.fields["imatrix.datasets"]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise CorruptFileError(f"{p}: imatrix.datasets must be an array of strings", hint=_HINT, path=p)
    chunks = g.number("imatrix.chunk_count", minimum=0)
    pairs: dict[str, dict[str, Any]] = {}
    for name, t in g.tensors.items():
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[suffix] = t
    if len(pairs) > MAX_ENTRIES:
        raise CorruptFileError(f"{p}: {len(pairs)} imatrix entries (at most {MAX_ENTRIES})", hint=_HINT, path=p)
    out = ImatrixFile(p, legacy=False, datasets=list(datasets), chunk_count=int(chunks))
    for name, pair in pairs.items():
        sums, counts = pair.get(".in_sum2"), pair.get(".counts")
        if sums is None or counts is None:
            raise CorruptFileError(f"{p}: imatrix entry {name!r} has sums without counts or counts without sums",
                                   hint=_HINT, path=p)
        if sums.tensor_type.name != "F32" or counts.tensor_type.name != "F32":
            raise CorruptFileError(f"{p}: imatrix entry {name!r}: sums and counts must be F32", hint=_HINT, path=p)
        nval, ncounts = int(sums.n_elements), int(counts.n_elements)
        if not 1 <= ncounts <= nval <= MAX_VALUES or nval % ncounts:
            raise CorruptFileError(f"{p}: imatrix entry {name!r}: {nval} sums do not split into {ncounts} experts",
                                   hint=_HINT, path=p)
        raw = [float(c) for c in counts.data.reshape(-1)]
        if not all(math.isfinite(c) and 0 <= c < 2**62 for c in raw):
            raise CorruptFileError(f"{p}: imatrix entry {name!r} has impossible token counts", hint=_HINT, path=p)
        # std::lround: halves away from zero (counts are non-negative here)
        out.entries[name] = _Entry(sums.data_offset, nval, [math.floor(c + 0.5) for c in raw])
    return out


def _load_legacy(p: Path) -> ImatrixFile:
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size < 4:
            raise CorruptFileError(f"{p}: not an imatrix file ({size} bytes)", hint=_HINT, path=p)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_legacy(p, buf, size)
    finally:
        buf.close()


def _parse_legacy(p: Path, buf: mmap.mmap, size: int) -> ImatrixFile:
    pos = 0

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > size:
            raise CorruptFileError(f"{p}: truncated legacy imatrix (reading {what})", hint=_HINT, path=p)
        (v,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        return int(v)

    n = i32("the entry count")
    if not 1 <= n <= MAX_ENTRIES:
        raise CorruptFileError(f"{p}: not an imatrix file (neither GGUF nor legacy: {n} entries)", hint=_HINT, path=p)
    out = ImatrixFile(p, legacy=True)
    for i in range(n):
        length = i32(f"entry {i + 1}'s name length")
        if not 0 <= length <= MAX_NAME or pos + length > size:
            raise CorruptFileError(f"{p}: entry {i + 1} has a name of {length} bytes", hint=_HINT, path=p)
        name = bytes(buf[pos:pos + length]).split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += length
        ncall, nval = i32(f"entry {name!r}'s call count"), i32(f"entry {name!r}'s value count")
        if not 1 <= nval <= MAX_VALUES or pos + 4 * nval > size:
            raise CorruptFileError(f"{p}: entry {name!r} has {nval} values, past the end of the file or out of range",
                                   hint=_HINT, path=p)
        out.entries[name] = _Entry(pos, nval, [ncall])
        pos += 4 * nval
    if pos + 4 <= size:
        out.chunk_count = i32("the chunk count")
        if pos + 4 <= size:
            length = i32("the dataset name length")
            if 0 < length <= MAX_NAME and pos + length <= size:
                out.datasets.append(bytes(buf[pos:pos + length]).split(b"\0", 1)[0].decode("utf-8", "replace"))
    return out


def write_legacy(path: str | Path, entries: dict[str, tuple[int, np.ndarray]], *, chunk_count: int = 0,
                 dataset: str = "") -> None:
    """A legacy `.dat` imatrix ({name: (ncall, sums)}): for tests and for tools that still read only this."""
    import numpy as np

    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, sums) in entries.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, sums.size))
            f.write(np.ascontiguousarray(sums, dtype="<f4").tobytes())
        f.write(struct.pack("<i", chunk_count))
        data = dataset.encode()
        f.write(struct.pack("<i", len(data)) + data)
        f.flush()
        os.fsync(f.fileno())
