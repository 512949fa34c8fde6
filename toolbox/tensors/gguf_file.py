"""GGUF files and split sets, read with gguf-py's GGUFReader (memory-mapped).

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


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"{self.path}: no such file", path=self.path)
        self.parts = split_parts(self.path)
        self.readers: list[Any] = []
        for p in self.parts:
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CorruptFileError(f"{p}: not a GGUF file (magic {magic!r})", path=p)
            try:
                reader = GGUFReader(p)
            except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on damage
                raise CorruptFileError(f"{p}: damaged GGUF ({type(exc).__name__}: {exc})",
                                       hint="the file is truncated or corrupt; write or download it again",
                                       path=p) from exc
            size = p.stat().st_size
            for t in reader.tensors:
                if t.data_offset + t.n_bytes > size:
                    raise CorruptFileError(f"{p}: tensor {t.name} runs past the end of the file: truncated", path=p)
            self.readers.append(reader)
        self.tensors: dict[str, Any] = {}
        for r in self.readers:
            for t in r.tensors:
                self.tensors[t.name] = t
        self.fields: dict[str, Any] = {}
        for r in self.readers[:1]:
            for key, field in r.fields.items():
                if not key.startswith("GGUF."):
                    self.fields[key] = field.contents()

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
        from converters.gguf_quant import decode

        t = self.tensors[name]
        shape = self.shape(name)
        raw = t.data if index is None else t.data[index]
        if index is not None:
            shape = shape[1:]
        return decode(raw, t.tensor_type.name, shape)
