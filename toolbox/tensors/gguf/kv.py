"""The KV metadata of a GGUF file, read fast: what the audit needs, and nothing more.

gguf-py's GGUFReader builds a numpy view for every element of every array, so a file with a
200k-token vocabulary takes 10-30 s to open; the audit needs a dozen scalar and string keys.
This reads the same header layout (with gguf-py's type codes and magic) straight from a
memory map and steps over long arrays without materialising them. Writing and the retrofit
still go through gguf-py; tests check this reader against GGUFReader key by key.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from toolbox.errors import CorruptFileError

MAX_ARRAY = 256  # longer arrays (vocabularies, merges) are skipped, reported as None

# GGUFValueType code -> struct format (gguf-py's GGUFValueType numbering)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: mmap.mmap, endian: str, path: Path) -> None:
        self.buf, self.endian, self.path, self.pos = buf, endian, path, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CorruptFileError(f"{self.path}: GGUF metadata runs past the end of the file: truncated",
                                   path=self.path)
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CorruptFileError(f"{self.path}: a GGUF string runs past the end of the file: truncated",
                                   path=self.path)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise CorruptFileError(f"{self.path}: unknown GGUF value type {vtype}", path=self.path)
        sub, n = self.take("I"), self.take("Q")
        if n <= MAX_ARRAY:
            return [self.value(sub) for _ in range(n)]
        if sub in _SCALARS:
            self.pos += n * struct.calcsize(_SCALARS[sub])
        else:
            for _ in range(n):
                self.skip(sub)
        return None

    def skip(self, vtype: int) -> None:
        if vtype == _STRING:
            length = self.take("Q")  # (not `self.pos += self.take(...)`: take() moves pos first)
            self.pos += length
        else:
            self.value(vtype)


def read_gguf_kv(path: str | Path) -> dict[str, Any]:
    """{key: value} of a GGUF file's metadata; arrays longer than MAX_ARRAY come back as None."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: cannot read ({exc})", path=path) from exc
    try:
        if buf[:4] != b"GGUF":
            raise CorruptFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})", path=path)
        (version,) = struct.unpack_from("<I", buf, 4)
        endian = "<" if version & 0xFFFF else ">"
        cur = _Cursor(buf, endian, path)
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise CorruptFileError(f"{path}: GGUF version {version} is not supported", path=path)
        cur.take("Q")  # tensor count
        n_kv = cur.take("Q")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            out[key] = cur.value(cur.take("I"))
        return out
    finally:
        buf.close()
