"""The safetensors container, read and validated from its header alone (stdlib only).

Format: 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`,
offsets relative to the end of the header), then the tensor bytes.

We parse it ourselves rather than through `safetensors.safe_open` because verify needs to
say *which* rule a file breaks (safe_open only says it failed), and listing 50 shards must
not import torch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from toolbox.errors import CorruptFileError
from toolbox.tensors import dtypes
from toolbox.tensors.jsonio import loads_json

# safetensors dtype name -> (itemsize in bytes, torch dtype attribute name), from the floor's one table
DTYPES: dict[str, tuple[int, str]] = {d.name: (d.itemsize, d.torch) for d in dtypes.TABLE}
FLOAT_DTYPES = dtypes.FLOAT_NAMES
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_DIMS = 16  # no model tensor has more; a longer shape list is not a checkpoint
MAX_NAME_CHARS = 4096
TORCH_TO_ST = {v[1]: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file (offsets absolute in the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    header_len: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: {what}",
        hint="the file is damaged or incomplete; download or write it again",
        path=path,
    )


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate a safetensors header; raise CorruptFileError naming the broken rule."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupt(path, "not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} is not plausible (1..{MAX_HEADER_BYTES} bytes)")
            if 8 + n > size:
                raise _corrupt(path, f"header length {n} runs past the end of the file ({size} bytes): truncated")
            raw = f.read(n)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc.strerror or exc}", path=path) from exc
    doc = parse_header_json(path, raw)
    metadata = _metadata(path, doc.pop("__metadata__", None))
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    for name, spec in doc.items():
        tensors[name] = _entry(path, name, spec, data_start)
    spans = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    for a, b in itertools.pairwise(spans):
        if b.begin < a.end:
            raise _corrupt(path, f"tensors {a.name!r} and {b.name!r} overlap in the data section")
    data_end = max((t.end for t in spans), default=data_start)
    if data_end > size:
        last = max(spans, key=lambda t: t.end)
        raise _corrupt(
            path, f"tensor {last.name!r} ends at byte {data_end} but the file has {size} bytes: truncated"
        )
    return SafetensorsHeader(path=path, header_len=n, file_size=size, tensors=tensors, metadata=metadata)


def parse_header_json(path: Path, raw: bytes) -> dict[str, object]:
    """The header's JSON object, parsed under jsonio's limits (depth, duplicate keys, NaN, huge integers)."""
    doc = loads_json(raw.rstrip(b" "), what=f"{path}: safetensors header", max_bytes=MAX_HEADER_BYTES,
                     expect=dict, path=path)
    if not isinstance(doc, dict):  # (loads_json's expect= already refused it; this narrows the type)
        raise _corrupt(path, "header is not a JSON object")
    return doc


def _metadata(path: Path, value: object) -> dict[str, str]:
    """`__metadata__`: absent or null, or an object of strings (safetensors' HashMap<String, String>)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _corrupt(path, f"__metadata__ must be an object of strings, not {_short(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise _corrupt(path, f"__metadata__[{k!r}] must be a string, not {type(v).__name__}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    if not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise _corrupt(path, f"tensor name {_short(name)} is empty, longer than {MAX_NAME_CHARS} or holds NUL")
    if not isinstance(spec, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {_short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {_short(shape)} (at most {MAX_DIMS} integers >= 0)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {_short(offsets)}")
    expected = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            path,
            f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes but "
            f"{dtype}{shape} needs {expected}",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in the given order."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw
