"""GGUF files and split sets, with gguf-py's type tables and a fast header parser (memory-mapped data).

Adds what GGUFReader leaves to callers: split sets (`-00001-of-0000N.gguf`) opened as one,
clear errors for bad magic, truncation and missing parts, and float tensors by name or by
one expert (dim-0 slice).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, CorruptFileError

if TYPE_CHECKING:
    import torch

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
GGUF_MAGIC = b"GGUF"


def split_parts(path: Path) -> list[Path]:
    """All files of a split set given any one of them (or just [path])."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise BadInputError(f"{path}: split set is missing {', '.join(missing)}",
                            hint="all parts of a split GGUF must sit in the same directory", path=path)
    return parts


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY_TYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I8": "int8", "I16": "int16",
                "I32": "int32", "I64": "int64"}


class _Damaged(Exception):
    pass


class _Header:
    """A GGUF header parsed straight from the bytes: KV (arrays in full) and tensor infos.

    gguf-py's GGUFReader builds a numpy view per array element (10-30 s for a 200k-token
    vocabulary); this takes well under a second and keeps the same tensor-info semantics.
    """

    def __init__(self, path: Path) -> None:
        import mmap
        import struct

        self.path = path
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages in only what is parsed
        (version,) = struct.unpack_from("<I", self.buf, 4)
        self.endian = "<" if version & 0xFFFF else ">"
        self.pos = 4
        version = self._take("I")
        if version not in (2, 3):
            raise _Damaged(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._take("Q"), self._take("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._take("I"))
        self.infos: list[tuple[str, list[int], int, int]] = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("Q") for _ in range(self._take("I"))]
            self.infos.append((name, dims, self._take("I"), self._take("Q")))
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = self.pos + (-self.pos % align)

    def _take(self, fmt: str) -> Any:
        import struct

        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Damaged("header runs past the end of the file")
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def _string(self) -> str:
        n = self._take("Q")
        if self.pos + n > len(self.buf):
            raise _Damaged("a string runs past the end of the file")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise _Damaged(f"unknown value type {vtype}")
        sub, n = self._take("I"), self._take("Q")
        if sub in _SCALARS:
            import struct

            fmt = f"{self.endian}{n}{_SCALARS[sub]}"
            size = struct.calcsize(fmt)
            if self.pos + size > len(self.buf):
                raise _Damaged("an array runs past the end of the file")
            values = list(struct.unpack_from(fmt, self.buf, self.pos))
            self.pos += size
            return values
        if sub == _STRING:  # vocabularies and merges: the hot loop, kept tight
            import struct

            out, buf, pos, fmt, end = [], self.buf, self.pos, self.endian + "Q", len(self.buf)
            for _ in range(n):
                if pos + 8 > end:
                    raise _Damaged("an array runs past the end of the file")
                (length,) = struct.unpack_from(fmt, buf, pos)
                pos += 8
                if pos + length > end:
                    raise _Damaged("a string runs past the end of the file")
                out.append(buf[pos:pos + length].decode("utf-8", errors="replace"))
                pos += length
            self.pos = pos
            return out
        return [self._value(sub) for _ in range(n)]


class GGUFTensor:
    """One tensor of a GGUF file: the attributes of gguf-py's ReaderTensor that corral uses."""

    def __init__(self, part: Path, name: str, dims: list[int], type_code: int, offset: int) -> None:
        import math

        import gguf
        import numpy as np

        self.part, self.name = part, name
        self.tensor_type = gguf.GGMLQuantizationType(type_code)
        self.shape = np.array(dims, dtype=np.uint64)  # ggml order (fastest dimension first)
        self.n_elements = math.prod(dims)
        block, size = gguf.GGML_QUANT_SIZES[self.tensor_type]
        self.n_bytes = self.n_elements // block * size
        self.data_offset = offset
        self._data: Any = None

    @property
    def data(self) -> Any:
        """A read-only memory map shaped as GGUFReader shapes it (quantized rows as bytes)."""
        if self._data is None:
            import gguf
            import numpy as np

            np_dims = tuple(int(d) for d in reversed(self.shape.tolist()))
            kind = _NUMPY_TYPES.get(self.tensor_type.name)
            if kind is None:
                kind, np_dims = "uint8", tuple(gguf.quant_shape_to_byte_shape(np_dims, self.tensor_type))
            self._data = np.memmap(self.part, dtype=kind, mode="r", offset=self.data_offset, shape=np_dims)
        return self._data


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"{self.path}: no such file", path=self.path)
        self.parts = split_parts(self.path)
        self._readers: list[Any] | None = None
        self.tensors: dict[str, GGUFTensor] = {}
        self.fields: dict[str, Any] = {}
        for i, p in enumerate(self.parts):
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CorruptFileError(f"{p}: not a GGUF file (magic {magic!r})", path=p)
            try:
                header = _Header(p)
                tensors = [GGUFTensor(p, name, dims, code, header.data_start + off)
                           for name, dims, code, off in header.infos]
            except (_Damaged, ValueError, KeyError, OverflowError) as exc:
                raise CorruptFileError(f"{p}: damaged GGUF ({exc})",
                                       hint="the file is truncated or corrupt; write or download it again",
                                       path=p) from exc
            size = p.stat().st_size
            for t in tensors:
                if t.data_offset + t.n_bytes > size:
                    raise CorruptFileError(f"{p}: tensor {t.name} runs past the end of the file: truncated", path=p)
                self.tensors[t.name] = t
            if i == 0:
                self.fields = dict(header.fields)
            header.buf.close()

    @property
    def readers(self) -> list[Any]:
        """gguf-py GGUFReaders of the parts (slow to open): for rewriting a file key by key."""
        if self._readers is None:
            from gguf import GGUFReader

            self._readers = [GGUFReader(p) for p in self.parts]
        return self._readers

    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.fields.get(f"{self.architecture}.{suffix}", default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy-order (rows first) element shape."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def load(self, name: str, index: int | None = None) -> torch.Tensor:
        """A float tensor (bf16 stays bf16, others float32), whole or one dim-0 slice."""
        from toolbox.tensors.gguf.quant import decode

        t = self.tensors[name]
        shape = self.shape(name)
        raw = t.data if index is None else t.data[index]
        if index is not None:
            shape = shape[1:]
        return decode(raw, t.tensor_type.name, shape)
