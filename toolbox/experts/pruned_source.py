"""A prune as a tensor source: the input's canonical tensors with only the kept experts, renumbered 0..k-1,
in every MoE layer (both expert tensors and the router's rows), read one expert slice at a time.

A converter reading it (`corral experts prune --to gguf`) gets the pruned model without a pruned copy on
disk; the values are the input's, so the result equals the conversion of `prune_experts`' HF output.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from toolbox.tensors.source import SourceView, TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

    from license.stamp import Stamp

MOE = re.compile(r"\.layers\.(\d+)\.feed_forward\.(experts\.gate_up_proj|experts\.down_proj|router\.weight)$")


class PrunedSource(SourceView):
    """`inner` with, in each MoE layer, the experts `kept[layer]` only; `metadata` is the pruned model's stamp."""

    def __init__(self, inner: TensorSource, kept: dict[int, list[int]], stamp: Stamp) -> None:
        self.inner, self.path, self.stamp = inner, inner.path, stamp
        self._ids: dict[str, list[int]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, info in inner.infos().items():
            m = MOE.search(name)
            if m is not None:
                self._ids[name] = kept[int(m[1])]
                info = TensorInfo(name, (len(self._ids[name]), *info.shape[1:]), info.dtype)
            self._infos[name] = info

    @property
    def metadata(self) -> dict[str, str]:
        return self.stamp.safetensors_metadata()

    def stored(self) -> TensorSource:
        return self  # expert k here is not expert k of the stored file

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        import torch

        ids = self._ids.get(name)
        if ids is None:
            return self.inner.load(name)
        if name.endswith("router.weight"):  # [E, H]: small, read at once
            return self.inner.load(name)[ids].contiguous()
        return torch.stack([self.inner.load_slice(name, e) for e in ids])

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        ids = self._ids.get(name)
        if ids is None:
            return self.inner.load_slice(name, index)
        if name.endswith("router.weight"):
            return self.load(name)[index]
        if isinstance(index, int):
            return self.inner.load_slice(name, ids[index])
        return torch.stack([self.inner.load_slice(name, ids[e]) for e in range(*index.indices(len(ids)))])
