"""Lazy tensor sources: list names/shapes/dtypes from headers, load a tensor or one dim-0
slice of it (one expert) only when asked."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.tensors.safetensors_format import DTYPES

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: BF16, F32, F8_E4M3, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]


class TensorSource(ABC):
    """A checkpoint as a stream of named tensors."""

    path: Path
    drop_after_read: bool = False  # each byte is read once: a source may keep it out of the page cache

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor, in storage order, from headers alone."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The whole tensor. Prefer `load_slice` for fused expert tensors."""

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        """tensor[index] along dim 0, reading only those bytes where the format allows it."""
        return self.load(name)[index]

    @property
    def metadata(self) -> dict[str, str]:
        """The checkpoint's own key/value metadata (safetensors `__metadata__`; a corral stamp lives there)."""
        return {}

    def stored(self) -> TensorSource:
        """The source holding the bytes as stored (a view returns what it wraps)."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def __contains__(self, name: str) -> bool:
        return name in self.infos()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SourceView(TensorSource):
    """A source that presents another one's tensors differently (`inner`): the file-level facts (metadata,
    the stored bytes, page-cache policy, open files) are the inner source's."""

    inner: TensorSource

    @property
    def metadata(self) -> dict[str, str]:
        return self.inner.metadata

    def stored(self) -> TensorSource:
        return self.inner.stored()

    @property  # type: ignore[override]
    def drop_after_read(self) -> bool:
        return self.inner.drop_after_read

    @drop_after_read.setter
    def drop_after_read(self, value: bool) -> None:
        self.inner.drop_after_read = value

    def close(self) -> None:
        self.inner.close()


def raw_file_source(source: TensorSource, name: str) -> Any:
    """The safetensors file reader holding `name` byte for byte as the output wants it (same name, same
    dtype: not a fused per-expert layout or dequantized FP8), or None."""
    inner = source.stored()
    if not hasattr(inner, "byte_range") or name not in inner.infos():
        return None
    if inner.infos()[name].dtype != source.infos()[name].dtype:
        return None
    return inner
