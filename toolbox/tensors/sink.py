"""Incremental sharded safetensors writer: tensors (or dim-0 slices of one) go to disk as
they come, so memory is bounded by the largest piece in flight, not by the model.

A small state machine, in the manner of gguf-py's writer: declare every tensor (name,
shape, dtype) first, then write their bytes in declaration order, then finish. Each shard's
header is written before its data, so the whole plan, metadata included, is fixed at
`begin()`. The writer writes into a directory it is given; atomicity comes from
`toolbox.tensors.atomic.atomic_directory` around it.

Because the plan alone decides which shard a tensor lands in and what each header says, any process
can write any shard: `shards=(i, ...)` writes only those files, byte for byte as the whole run writes
them (callers skip the tensors `wanted()` refuses, so nothing else is read or computed), and
`shards=()` writes only the index, from the plan: the step that assembles the shards.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.tensors.direct_io import DirectFile
from toolbox.tensors.safetensors_format import DTYPES, TORCH_TO_ST, encode_header

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


class _State(Enum):
    DECLARING = 1
    WRITING = 2
    FINISHED = 3


@dataclass
class _Planned:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]


MIN_SPLIT_BYTES = 10**6  # a size limit below 1 MB is a typo (`1` for `1G`), never a plan
MAX_SIZE_BYTES = 1 << 60
_SIZE = re.compile(r"(\d{1,15})(?:\.(\d{1,9}))?\s{0,4}(KI|MI|GI|TI|K|M|G|T)?B?")


def parse_size(text: str | int, *, minimum: int = 1) -> int:
    """'50G', '500MB', '2GiB', '1000' -> bytes (decimal units as HF uses them, binary with 'i').

    0 means "no limit" and is always accepted; anything else must lie in [minimum, 2**60] bytes
    (split sizes pass minimum=MIN_SPLIT_BYTES).
    Negative numbers, NaN, exponents and other text are refused (UsageError, exit 2)."""
    from toolbox.errors import InvalidSizeError

    hint = f"write e.g. 50G, 500M or 2GiB (at least {minimum:,} bytes), or 0 for no limit"
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise InvalidSizeError(f"{text!r} is not a size", hint=hint)
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(text.strip().upper()[:64])
        if m is None:
            raise InvalidSizeError(f"{text[:64]!r} is not a size", hint=hint)
        units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
                 "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
        scale = units[unit] if unit else 1
        value = int(whole) * scale + int(frac or "0") * scale // 10 ** len(frac)
    if value != 0 and not minimum <= value <= MAX_SIZE_BYTES:
        why = "negative" if value < 0 else f"below {minimum:,} bytes" if value < minimum else "too large"
        raise InvalidSizeError(f"{text!r} is not a usable size ({why})", hint=hint)
    return value


def shard_count(sizes: Collection[int], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
    """How many files a writer with this limit writes for tensors of these byte sizes (in declaration order):
    the same rule as `SafetensorsWriter.begin`, for a caller fanning shards out before any is written."""
    return _assign(list(sizes), max_shard_bytes)[-1] + 1 if sizes else 1


def _assign(sizes: list[int], max_shard_bytes: int) -> list[int]:
    """Shard of each tensor: a new shard starts when the next tensor would overflow a non-empty one."""
    out, shard, used = [], 0, 0
    for n in sizes:
        if used and used + n > max_shard_bytes:
            shard, used = shard + 1, 0
        out.append(shard)
        used += n
    return out


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes without a copy when it is already contiguous."""
    import torch

    t = tensor.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def st_dtype(tensor: torch.Tensor) -> str:
    return TORCH_TO_ST[str(tensor.dtype).removeprefix("torch.")]


class SafetensorsWriter:
    """Write a checkpoint's tensors into `model-0000i-of-0000n.safetensors` + index.

    `shards` (0-based): write only those shard files; `()`: only the index, what the step assembling the shards
    writes (with the rest of the directory: `writes_rest`); None: every shard, then the index."""

    def __init__(self, directory: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, prefix: str = "model",
                 shards: Collection[int] | None = None) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.shards = None if shards is None else frozenset(int(i) for i in shards)
        self.metadata = dict(metadata or {})
        self.prefix = prefix
        self._plan: dict[str, _Planned] = {}
        self._state = _State.DECLARING
        self._order: list[_Planned] = []
        self._todo: list[_Planned] = []  # the tensors of the shards this writer writes, in order
        self._cursor = 0  # index in _todo of the tensor being written
        self._written = 0  # bytes of the current tensor written so far
        self._file: DirectFile | None = None
        self._shard_open = -1
        self.shard_names: list[str] = []

    # -- declaring -------------------------------------------------------------------------
    def add(self, name: str, shape: tuple[int, ...] | list[int], dtype: str) -> None:
        self._expect(_State.DECLARING, "add")
        if name in self._plan:
            raise ValueError(f"tensor {name!r} declared twice")
        if dtype not in DTYPES:
            raise ValueError(f"unknown safetensors dtype {dtype!r}")
        self._plan[name] = _Planned(name, dtype, tuple(int(d) for d in shape))

    def begin(self) -> None:
        """Fix the plan: assign shards (in declaration order) and name the files."""
        self._expect(_State.DECLARING, "begin")
        self._order = list(self._plan.values())
        for p, shard in zip(self._order, _assign([p.nbytes for p in self._order], self.max_shard_bytes), strict=True):
            p.shard = shard
        n = (self._order[-1].shard + 1) if self._order else 1
        if self.shards is not None and not self.shards <= set(range(n)):
            from toolbox.errors import UsageError

            raise UsageError(f"shards {sorted(self.shards - set(range(n)))} requested of a plan of {n} shards",
                             hint=f"shards are numbered 0 to {n - 1}")
        if n == 1:
            self.shard_names = [f"{self.prefix}.safetensors"]
        else:
            self.shard_names = [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._todo = [p for p in self._order if self._writes(p.shard)]
        self._state = _State.WRITING
        if not self._order and self._writes(0):
            self._open_shard(0)

    def _writes(self, shard: int) -> bool:
        return self.shards is None or shard in self.shards

    @property
    def writes_rest(self) -> bool:
        """Whether this run writes what is not a shard (the index; a caller's config and license files)."""
        return self.shards is None or not self.shards

    def wanted(self, name: str) -> bool:
        """Whether this writer writes `name`'s bytes (after begin()): a caller skips reading the others."""
        if self._state is _State.DECLARING:
            raise RuntimeError("SafetensorsWriter.wanted() called before begin()")
        return self._writes(self._plan[name].shard)

    # -- writing ----------------------------------------------------------------------------
    @property
    def next_name(self) -> str | None:
        """The tensor whose bytes are expected next (None when all are written)."""
        return self._todo[self._cursor].name if self._cursor < len(self._todo) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor, or the next dim-0 slice of it (e.g. one expert)."""
        self._expect(_State.WRITING, "write")
        p = self._current(name)
        if st_dtype(tensor) != p.dtype:
            raise ValueError(f"{name}: got dtype {st_dtype(tensor)}, declared {p.dtype}")
        shape = tuple(tensor.shape)
        if shape != p.shape and shape != p.shape[1:] and shape[1:] != p.shape[1:]:
            raise ValueError(f"{name}: got shape {shape}, declared {p.shape}")
        self.write_bytes(name, tensor_bytes(tensor))

    def write_bytes(self, name: str, data: memoryview | bytes) -> None:
        """Write raw bytes for the current tensor (all at once or in pieces)."""
        self._expect(_State.WRITING, "write")
        p = self._current(name)
        if self._shard_open != p.shard:
            self._open_shard(p.shard)
        assert self._file is not None
        n = len(data) if isinstance(data, bytes) else data.nbytes
        if self._written + n > p.nbytes:
            raise ValueError(f"{name}: {self._written + n} bytes written, declared {p.nbytes}")
        self._file.write(data)
        self._written += n
        if self._written == p.nbytes:
            self._cursor += 1
            self._written = 0

    def copy_range(self, name: str, src_path: str | Path, offset: int, length: int) -> None:
        """Write `length` bytes of the current tensor straight from another file (read into the output's
        aligned write buffers: one copy, no trip through torch)."""
        self._expect(_State.WRITING, "write")
        p = self._current(name)
        if self._shard_open != p.shard:
            self._open_shard(p.shard)
        assert self._file is not None
        if self._written + length > p.nbytes:
            raise ValueError(f"{name}: {self._written + length} bytes written, declared {p.nbytes}")
        self._file.copy_from(src_path, offset, length)
        self._written += length
        if self._written == p.nbytes:
            self._cursor += 1
            self._written = 0

    def finish(self) -> list[Path]:
        """Close the last shard and write the index (when sharded). Returns written files."""
        self._expect(_State.WRITING, "finish")
        if self._cursor != len(self._todo):
            missing = [p.name for p in self._todo[self._cursor:]]
            raise ValueError(f"finish() with {len(missing)} tensors not written, first {missing[0]!r}")
        self._close_shard()
        paths = [self.directory / s for i, s in enumerate(self.shard_names) if self._writes(i)]
        if self.writes_rest and len(self.shard_names) > 1:
            paths.append(self.write_index())
        self._state = _State.FINISHED
        return paths

    def write_index(self, directory: str | Path | None = None) -> Path:
        """Write model.safetensors.index.json from the plan (into `directory`, default the writer's): what the
        whole run writes last; a shards-only run leaves it to the step that assembles the shards."""
        if self._state is _State.DECLARING:
            raise RuntimeError("SafetensorsWriter.write_index() called before begin()")
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in self._order), **self.metadata},
            "weight_map": {p.name: self.shard_names[p.shard] for p in self._order},
        }
        index_path = Path(directory or self.directory) / INDEX_NAME
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        return index_path

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None

    # -- internals --------------------------------------------------------------------------
    def _expect(self, state: _State, call: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"SafetensorsWriter.{call}() called in state {self._state.name}")

    def _current(self, name: str) -> _Planned:
        if self._cursor >= len(self._todo):
            raise ValueError(f"{name}: all declared tensors are already written")
        p = self._todo[self._cursor]
        if p.name != name:
            raise ValueError(f"expected bytes of {p.name!r} next, got {name!r}")
        return p

    def _open_shard(self, shard: int) -> None:
        self._close_shard()
        entries = [(p.name, p.dtype, p.shape) for p in self._order if p.shard == shard]
        f = DirectFile(self.directory / self.shard_names[shard])
        f.write(encode_header(entries, self.metadata))
        self._file, self._shard_open = f, shard

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()
