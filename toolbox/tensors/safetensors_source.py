"""HF safetensors checkpoints (one file, or shards with model.safetensors.index.json).

Bytes are read with positioned reads into a fresh buffer rather than through a memory map:
a mapped 20 GiB expert tensor would stay resident (and count in RSS) as pages are touched,
while a read of one expert costs exactly that expert's bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from toolbox.errors import BadInputError, CorruptFileError
from toolbox.tensors.atomic import safe_join
from toolbox.tensors.jsonio import load_json
from toolbox.tensors.safetensors_format import DTYPES, SafetensorsHeader, TensorEntry, read_header
from toolbox.tensors.sink import INDEX_NAME
from toolbox.tensors.source import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch


MAX_INDEX_BYTES = 64 * 1024 * 1024  # a 128-expert per-expert-key index is a few MB
POOL_MIN_BYTES = 1 << 20  # smaller reads are cheap to allocate: only large ones are pooled
POOL_SIZE = 8  # buffers kept for reuse: a streamed conversion holds about three pieces in flight


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json; CorruptFileError naming the entry when it is not one.

    Each value must be a `.safetensors` file name (a string, no NUL); `metadata`, when present, an
    object. Whether a name stays inside the directory is checked where it is joined (`shard_files`;
    verify reports it as `index.path`).
    """
    doc = load_json(index, max_bytes=MAX_INDEX_BYTES, expect=dict)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _bad_index(index, f"weight_map must be a non-empty object, not {_kind(weight_map)}")
    if doc.get("metadata") is not None and not isinstance(doc["metadata"], dict):
        raise _bad_index(index, f"metadata must be an object, not {_kind(doc['metadata'])}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or "\x00" in shard or len(shard) > 1024:
            raise _bad_index(index, f"weight_map[{name[:80]!r}] must name a .safetensors file, not {_kind(shard)}")
    return weight_map


def _kind(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:50]}..."


def _bad_index(index: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{index}: not a valid safetensors index: {what}",
                            hint="regenerate the index or remove it (shards are then listed from the directory)",
                            path=index)


def shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a checkpoint directory or file, and the index's weight_map if any."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise BadInputError(f"{path}: no such file or directory", path=path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_index(index)
        names = sorted(set(weight_map.values()))
        try:
            files = [safe_join(path, n) for n in names]
        except BadInputError as exc:
            raise _bad_index(index, exc.message) from None
        for f in files:
            if not f.is_file():
                raise CorruptFileError(
                    f"{index}: names shard {f.name} which does not exist",
                    hint="the download is incomplete; fetch the missing shard",
                    path=f,
                )
        return files, weight_map
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise BadInputError(
            f"{path}: no *.safetensors files and no {INDEX_NAME}",
            hint="point at an HF checkpoint directory (config.json + safetensors shards)",
            path=path,
        )
    return files, None


class SafetensorsSource(TensorSource):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files, weight_map = shard_files(self.path)
        self.headers: list[SafetensorsHeader] = [read_header(f) for f in files]
        self._entries: dict[str, tuple[SafetensorsHeader, TensorEntry]] = {}
        for h in self.headers:
            for name, entry in h.tensors.items():
                if name in self._entries:
                    raise CorruptFileError(
                        f"tensor {name!r} appears in both {self._entries[name][0].path.name} and {h.path.name}",
                        path=h.path,
                    )
                self._entries[name] = (h, entry)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._entries:
                    raise CorruptFileError(
                        f"{self.path / INDEX_NAME}: lists {name!r} in {shard}, which does not contain it",
                        path=self.path / INDEX_NAME,
                    )
        self._infos = {n: TensorInfo(n, e.shape, e.dtype) for n, (_h, e) in self._entries.items()}
        self._fds: dict[Path, int] = {}
        # set by a caller that reads each byte once (a conversion): read ranges are dropped from the page
        # cache, so a checkpoint larger than memory streams through without evicting everything else
        self.drop_after_read = False
        # set by a caller that streams (a conversion): read buffers are reused once nothing refers to them
        self.reuse_buffers = False
        self._pool: list[torch.Tensor] = []
        self._pool_lock = threading.Lock()

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    @property
    def metadata(self) -> dict[str, str]:
        return self.headers[0].metadata if self.headers else {}

    def entry(self, name: str) -> tuple[SafetensorsHeader, TensorEntry]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_bytes(self, name: str, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Bytes [begin, end) of a tensor's data, as a uint8 tensor (fresh memory, or with `reuse_buffers` a
        pooled buffer no earlier result still uses)."""
        header, entry = self.entry(name)
        end = entry.nbytes if end is None else end
        out = self._buffer(end - begin)
        view = memoryview(out.numpy())
        fd, pos, done = self._fd(header.path), entry.begin + begin, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise CorruptFileError(f"{header.path}: unexpected end of file reading {name!r}", path=header.path)
            done += n
        if self.drop_after_read and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, pos, len(view), os.POSIX_FADV_DONTNEED)
        return out

    def _buffer(self, n: int) -> torch.Tensor:
        """n bytes to read into. With `reuse_buffers`, reads of POOL_MIN_BYTES or more go into a pool of at most
        POOL_SIZE buffers: a buffer is free again when no tensor but the pool's uses its storage (every view,
        detached tensor and numpy array made from a result holds a reference to the storage; torch's count of
        them, not Python's refcount of one tensor object, says so). Filling fresh memory costs a page fault
        per 4 KiB page, ~1.8 CPU-s per 2.6 GiB measured here: a third of a conversion's read cost."""
        import torch

        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if not self.reuse_buffers or n < POOL_MIN_BYTES or use_count is None:
            return torch.empty(n, dtype=torch.uint8)
        with self._pool_lock:  # the view is taken before another reader can see the buffer free
            free = [b for b in self._pool if use_count(b.untyped_storage()._cdata) <= 2]  # the pool's + this call's
            fits = [b for b in free if b.numel() >= n]
            if fits:
                return min(fits, key=lambda b: b.numel())[:n]
            # all too small: dropped, so that the pool never holds more than the reads in flight (by identity:
            # list.remove compares tensors with ==, elementwise, which fails for buffers of other sizes)
            self._pool = [b for b in self._pool if all(b is not f for f in free)]
            del free, fits
            if len(self._pool) >= POOL_SIZE:
                return torch.empty(n, dtype=torch.uint8)
            buf = torch.empty(n, dtype=torch.uint8)
            self._pool.append(buf)
            return buf[:n]

    def byte_range(self, name: str, index: int | None = None) -> tuple[Path, int, int]:
        """(file, offset, length) of a tensor's bytes, or of its dim-0 row `index` (for in-kernel copies)."""
        header, entry = self.entry(name)
        if index is None:
            return header.path, entry.begin, entry.nbytes
        row = entry.nbytes // entry.shape[0]
        return header.path, entry.begin + index * row, row

    def load(self, name: str) -> torch.Tensor:
        import torch

        _h, entry = self.entry(name)
        raw = self.read_bytes(name)
        return raw.view(getattr(torch, DTYPES[entry.dtype][1])).reshape(entry.shape)

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        _h, entry = self.entry(name)
        if not entry.shape:
            raise IndexError(f"{name} is a scalar")
        rows = entry.shape[0]
        row_bytes = entry.nbytes // rows if rows else 0
        if isinstance(index, int):
            i = index + rows if index < 0 else index
            if not 0 <= i < rows:
                raise IndexError(f"{name}: index {index} out of range for {rows} rows")
            start, stop, shape = i, i + 1, entry.shape[1:]
        else:
            start, stop, step = index.indices(rows)
            if step != 1:
                return self.load(name)[index]
            shape = (max(stop - start, 0), *entry.shape[1:])
        raw = self.read_bytes(name, start * row_bytes, max(stop, start) * row_bytes)
        return raw.view(getattr(torch, DTYPES[entry.dtype][1])).reshape(shape)

    def close(self) -> None:
        self._pool.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
