"""GGUF files and split sets: the one GGUF header parser corral has, bounded and validated.

gguf-py's GGUFReader builds a numpy view per array element (10-30 s for a 200k-token
vocabulary) and trusts the header: a count of 2**60 tensors, an array of arrays, an alignment
of 0 or a string that runs past the end of the file end in a numpy or struct exception. This
parser reads the same layout (gguf-py's type codes) straight from a memory map, checks every
count, length and offset against the file's size before it is used, and refuses what
llama.cpp's loader (ggml/src/gguf.cpp) refuses: nested arrays, duplicate keys or tensor names,
more than 4 dimensions, unknown tensor types, rows that are not whole blocks, tensor data off
the alignment, overlapping or past the end, an alignment that is not a power of two. Each
refusal is one CorruptFileError naming the file and the key or tensor.

Two entry points share it: `GGUFFile` (KV, tensor infos, float tensors by name or by expert,
split sets `-0000i-of-0000N.gguf` opened as one) and `read_gguf_kv` (KV only, long arrays
skipped: what the license audit needs, in milliseconds).
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, CorruptFileError
from toolbox.tensors.dtypes import NUMPY_NAME

if TYPE_CHECKING:
    import torch

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
GGUF_MAGIC = b"GGUF"
MAX_ARRAY = 256  # read_gguf_kv: longer arrays (vocabularies, merges) are skipped, reported as None
MAX_ARRAY_ITEMS = 1 << 22  # 4M items: 10x the merges of a 200k vocabulary; more is not a model file
MAX_NAME_BYTES = 1 << 16  # keys and tensor names (llama.cpp's own tensor names stay under 64 bytes)
MAX_STRING_BYTES = 1 << 26  # one string value (a chat template, a stored config): 64 MiB
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 30
_HINT = "the file is truncated or corrupt; write or download it again"

# GGUFValueType code -> struct format (gguf-py's GGUFValueType numbering)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


_MISSING = object()


class _Damaged(Exception):
    """A broken rule, before the file's name is attached."""


def split_numbers(path: Path) -> tuple[str, int, int] | None:
    """(stem, part, count) of a split-set file name, None for a plain name; refuses impossible numbers."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return None
    i, n = int(m["i"]), int(m["n"])
    if not 1 <= i <= n:
        raise CorruptFileError(f"{path}: split name says part {i} of {n}, which cannot exist",
                               hint="split parts are numbered 00001..N of N (N >= 1); rename the file", path=path)
    return m["stem"], i, n


def split_parts(path: Path) -> list[Path]:
    """All files of a split set given any one of them (or just [path])."""
    numbers = split_numbers(path)
    if numbers is None:
        return [path]
    stem, _, n = numbers
    parts = [path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadInputError(f"{path}: split set is missing {shown}",
                            hint="all parts of a split GGUF must sit in the same directory", path=path)
    return parts


class _Header:
    """A GGUF header parsed from a memory map: KV and (unless `kv_only`) tensor infos.

    With `max_array`, arrays longer than it are stepped over and stored as None.
    """

    def __init__(self, path: Path, buf: Any, *, kv_only: bool = False, max_array: int | None = None) -> None:
        self.path, self.buf, self.max_array, self.end = path, buf, max_array, len(buf)
        if self.end < 24:
            raise _Damaged(f"only {self.end} bytes, shorter than a GGUF header (24): truncated")
        (version,) = struct.unpack_from("<I", buf, 4)
        self.endian = "<" if version & 0xFFFF else ">"
        self.pos = 4
        version = self._take("I")
        if version not in (2, 3):
            raise _Damaged(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._take("Q"), self._take("Q")
        # the smallest KV entry is 13 bytes (empty key, type, one byte), a tensor info 24 (empty name, 0 dims)
        if n_kv * 13 > self.end - self.pos:
            raise _Damaged(f"the header declares {n_kv} KV entries, more than {self.end} bytes can hold")
        if n_tensors * 24 > self.end - self.pos:
            raise _Damaged(f"the header declares {n_tensors} tensors, more than {self.end} bytes can hold")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string(MAX_NAME_BYTES, "a key")
            if key in self.fields:
                raise _Damaged(f"key {key!r} appears twice")
            try:
                self.fields[key] = self._value(self._take("I"))
            except _Damaged as exc:
                raise _Damaged(f"key {key!r}: {exc}") from None
        self.alignment = self._alignment()
        self.infos: list[tuple[str, list[int], int, int]] = []
        if kv_only:
            return
        for _ in range(n_tensors):
            name = self._string(MAX_NAME_BYTES, "a tensor name")
            n_dims = self._take("I")
            if n_dims > MAX_DIMS:
                raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = [self._take("Q") for _ in range(n_dims)]
            self.infos.append((name, dims, self._take("I"), self._take("Q")))
        self.data_start = self.pos + (-self.pos % self.alignment)

    def _alignment(self) -> int:
        align = self.fields.get("general.alignment", 32)
        if type(align) is not int or align <= 0 or align & (align - 1) or align > MAX_ALIGNMENT:
            raise _Damaged(f"general.alignment = {align!r} is not a power of two (1..2**30)")
        return align

    def _take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise _Damaged("the header runs past the end of the file: truncated")
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def _string(self, limit: int = MAX_STRING_BYTES, what: str = "a string") -> str:
        n = self._take("Q")
        if n > limit:
            raise _Damaged(f"{what} of {n} bytes (at most {limit})")
        if self.pos + n > self.end:
            raise _Damaged(f"{what} of {n} bytes runs past the end of the file: truncated")
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
        if sub == _ARRAY:
            raise _Damaged("an array of arrays (llama.cpp does not read nested arrays)")
        if sub != _STRING and sub not in _SCALARS:
            raise _Damaged(f"an array of unknown value type {sub}")
        item = 8 if sub == _STRING else struct.calcsize(_SCALARS[sub])  # a string is at least its length
        if n * item > self.end - self.pos:
            raise _Damaged(f"an array of {n} items runs past the end of the file: truncated")
        if self.max_array is not None and n > self.max_array:
            self._skip_array(sub, n)
            return None
        if n > MAX_ARRAY_ITEMS:
            raise _Damaged(f"an array of {n} items (at most {MAX_ARRAY_ITEMS})")
        if sub in _SCALARS:
            fmt = f"{self.endian}{n}{_SCALARS[sub]}"
            values = list(struct.unpack_from(fmt, self.buf, self.pos))
            self.pos += n * item
            return values
        return self._strings(n)

    def _strings(self, n: int) -> list[str]:
        """n strings (vocabularies and merges: the hot loop, kept tight)."""
        out, buf, pos, fmt, end = [], self.buf, self.pos, self.endian + "Q", self.end
        for _ in range(n):
            if pos + 8 > end:
                raise _Damaged("an array runs past the end of the file: truncated")
            (length,) = struct.unpack_from(fmt, buf, pos)
            pos += 8
            if pos + length > end:
                raise _Damaged(f"a string of {length} bytes runs past the end of the file: truncated")
            out.append(buf[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out

    def _skip_array(self, sub: int, n: int) -> None:
        if sub in _SCALARS:
            self.pos += n * struct.calcsize(_SCALARS[sub])
            return
        fmt, buf, pos, end = self.endian + "Q", self.buf, self.pos, self.end
        for _ in range(n):
            if pos + 8 > end:
                raise _Damaged("an array runs past the end of the file: truncated")
            pos += 8 + struct.unpack_from(fmt, buf, pos)[0]
        if pos > end:
            raise _Damaged("a string runs past the end of the file: truncated")
        self.pos = pos


def _parse(path: Path, **kwargs: Any) -> _Header:
    """The validated header of one file; CorruptFileError (exit 3) naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CorruptFileError(f"{path}: not a GGUF file (magic {magic!r})", hint=_HINT, path=path)
            if size < 24:
                raise CorruptFileError(f"{path}: only {size} bytes, shorter than a GGUF header (24): truncated",
                                       hint=_HINT, path=path)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages in only what is parsed
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc.strerror or exc}", path=path) from None
    try:
        return _Header(path, buf, **kwargs)
    except _Damaged as exc:
        raise CorruptFileError(f"{path}: damaged GGUF header: {exc}", hint=_HINT, path=path) from None
    finally:
        buf.close()


def read_gguf_kv(path: str | Path) -> dict[str, Any]:
    """{key: value} of a GGUF file's metadata; arrays longer than MAX_ARRAY come back as None."""
    return _parse(Path(path), kv_only=True, max_array=MAX_ARRAY).fields


class GGUFTensor:
    """One tensor of a GGUF file: the attributes of gguf-py's ReaderTensor that corral uses."""

    def __init__(self, part: Path, name: str, dims: list[int], type_code: int, offset: int) -> None:
        import math

        import gguf
        import numpy as np

        self.part, self.name = part, name
        try:
            self.tensor_type = gguf.GGMLQuantizationType(type_code)
            block, size = gguf.GGML_QUANT_SIZES[self.tensor_type]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor {name!r} has unknown type {type_code}") from None
        if any(d >= 1 << 62 for d in dims) or math.prod(dims) >= 1 << 62:
            raise _Damaged(f"tensor {name!r} has an impossible shape {dims}")
        if dims and dims[0] % block:
            raise _Damaged(f"tensor {name!r}: rows of {dims[0]} are not whole {self.tensor_type.name} blocks "
                           f"of {block}")
        self.shape = np.array(dims, dtype=np.uint64)  # ggml order (fastest dimension first)
        self.n_elements = math.prod(dims)
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
            kind = NUMPY_NAME.get(self.tensor_type.name)  # GGUF's plain types share the safetensors names
            if kind is None:
                kind, np_dims = "uint8", tuple(gguf.quant_shape_to_byte_shape(np_dims, self.tensor_type))
            self._data = np.memmap(self.part, dtype=kind, mode="r", offset=self.data_offset, shape=np_dims)
        return self._data


def _tensors(path: Path, header: _Header, size: int) -> list[GGUFTensor]:
    """The tensor infos of one part, checked: aligned, inside the file, not overlapping."""
    out: list[GGUFTensor] = []
    for name, dims, code, off in header.infos:
        if off % header.alignment:
            raise _Damaged(f"tensor {name!r} at offset {off} is off the {header.alignment}-byte alignment")
        t = GGUFTensor(path, name, dims, code, header.data_start + off)
        if t.data_offset + t.n_bytes > size:
            raise _Damaged(f"tensor {name!r} runs past the end of the file: truncated")
        out.append(t)
    spans = sorted(out, key=lambda t: (t.data_offset, t.n_bytes))
    for a, b in itertools.pairwise(spans):
        if b.data_offset < a.data_offset + a.n_bytes:
            raise _Damaged(f"tensors {a.name!r} and {b.name!r} overlap")
    return out


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
            header = _parse(p)
            try:
                tensors = _tensors(p, header, p.stat().st_size)
                _check_split_keys(header.fields, i, len(self.parts))
            except _Damaged as exc:
                raise CorruptFileError(f"{p}: damaged GGUF header: {exc}", hint=_HINT, path=p) from None
            for t in tensors:
                if t.name in self.tensors:
                    raise CorruptFileError(f"{p}: tensor {t.name!r} appears twice in the file or split set",
                                           hint=_HINT, path=p)
                self.tensors[t.name] = t
            if i == 0:
                self.fields = dict(header.fields)

    @property
    def readers(self) -> list[Any]:
        """gguf-py GGUFReaders of the parts (slow to open): for rewriting a file key by key."""
        if self._readers is None:
            from gguf import GGUFReader

            self._readers = [GGUFReader(p) for p in self.parts]
        return self._readers

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def json_field(self, key: str) -> dict[str, Any] | None:
        """A string key holding a JSON object (corral.hf_config), parsed under jsonio's bounds; None if absent."""
        from toolbox.tensors.jsonio import loads_json

        value = self.fields.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise CorruptFileError(f"{self.path}: {key} must be a JSON string, not {type(value).__name__}",
                                   hint=_HINT, path=self.path)
        return loads_json(value, what=f"{self.path}: {key}", max_bytes=MAX_STRING_BYTES, expect=dict, path=self.path)

    def number(self, key: str, default: Any = _MISSING, *, kind: type = int, minimum: int | None = None) -> Any:
        """A numeric key as `kind` (int or float): CorruptFileError naming the key when it is missing (and no
        default is given), a string, a bool, an array, below `minimum` or, for int, a float; floats finite."""
        value = self.fields.get(key)
        if value is None:
            if default is _MISSING:
                raise CorruptFileError(f"{self.path}: GGUF key {key} is missing", hint=_HINT, path=self.path)
            return default
        if type(value) not in (int, float) or (kind is int and type(value) is not int) or \
                (type(value) is float and not math.isfinite(value)):
            raise CorruptFileError(f"{self.path}: GGUF key {key} must be {'an integer' if kind is int else 'a number'}"
                                   f", not {str(value)[:40]!r}", hint=_HINT, path=self.path)
        if minimum is not None and value < minimum:
            raise CorruptFileError(f"{self.path}: GGUF key {key} = {value} is below {minimum}", hint=_HINT,
                                   path=self.path)
        return kind(value)

    def list_key(self, key: str) -> list[Any]:
        """An array key ([] when absent); CorruptFileError naming the key when it holds something else."""
        value = self.fields.get(key, [])
        if not isinstance(value, list):
            raise CorruptFileError(f"{self.path}: GGUF key {key} must be an array, not {type(value).__name__}",
                                   hint=_HINT, path=self.path)
        return value

    def arch_number(self, suffix: str, default: Any = _MISSING, *, kind: type = int,
                    minimum: int | None = None) -> Any:
        """`number` of `{architecture}.{suffix}`."""
        return self.number(f"{self.architecture}.{suffix}", default, kind=kind, minimum=minimum)

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


def _check_split_keys(fields: dict[str, Any], index: int, count: int) -> None:
    """split.no / split.count (gguf-py and llama.cpp's gguf-split write them) must match the file names."""
    no, n = fields.get("split.no"), fields.get("split.count")
    if n is not None and n != count and count > 1:
        raise _Damaged(f"split.count = {n!r} but the file names say {count} parts")
    if no is not None and count > 1 and no != index:
        raise _Damaged(f"split.no = {no!r} but the file name says part {index + 1} (split.no {index})")
