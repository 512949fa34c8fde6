"""A dense extraction as a tensor source: in each MoE layer, the shared expert and one routed expert folded
into one MLP (`toolbox.experts.extract`), computed when a converter reads it; the layer's router, routed
and shared expert tensors are hidden. `corral experts extract --to gguf` reads it: no dense HF copy on disk.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from toolbox.tensors.source import SourceView, TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

    from license.stamp import Stamp

FF = re.compile(r"\.layers\.(\d+)\.feed_forward\.(.+)$")
PROJS = ("gate_proj", "up_proj", "down_proj")


def folded(source: TensorSource, base: str, proj: str, e: int, width: int) -> torch.Tensor:
    """`base`'s folded `proj` weight: the shared expert's rows (columns, for down) then routed expert e's."""
    import torch

    shared = source.load(f"{base}shared_expert.{proj}.weight")
    if proj == "down_proj":  # [H, I] | down[e].T [H, I] -> [H, 2I]
        routed = source.load_slice(f"{base}experts.down_proj", e).T
        return torch.cat([shared, routed.to(shared.dtype)], dim=1).contiguous()
    gate_up = source.load_slice(f"{base}experts.gate_up_proj", e)  # [H, 2I]
    part = gate_up[:, :width] if proj == "gate_proj" else gate_up[:, width:]
    return torch.cat([shared, part.T.to(shared.dtype)], dim=0).contiguous()


class DenseSource(SourceView):
    """`inner` with each MoE layer in `chosen` ({layer: routed expert}) folded into a dense MLP."""

    def __init__(self, inner: TensorSource, chosen: dict[int, int], width: int, hidden: int, stamp: Stamp) -> None:
        self.inner, self.path, self.stamp, self.width = inner, inner.path, stamp, width
        raw = inner.infos()
        self._folded: dict[str, tuple[str, str, int]] = {}  # name -> (block prefix, proj, expert)
        self._infos: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            m = FF.search(name)
            if m is None or int(m[1]) not in chosen:
                self._infos[name] = info
                continue
            if m[2] != "router.weight":  # the folded MLP takes the router's place
                continue
            base = name.removesuffix("router.weight")
            dtype = raw[f"{base}experts.gate_up_proj"].dtype
            for proj in PROJS:
                shape = (hidden, 2 * width) if proj == "down_proj" else (2 * width, hidden)
                self._infos[f"{base}{proj}.weight"] = TensorInfo(f"{base}{proj}.weight", shape, dtype)
                self._folded[f"{base}{proj}.weight"] = (base, proj, chosen[int(m[1])])

    @property
    def metadata(self) -> dict[str, str]:
        return self.stamp.safetensors_metadata()

    def stored(self) -> TensorSource:
        return self

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        if name in self._folded:
            base, proj, e = self._folded[name]
            return folded(self.inner, base, proj, e, self.width)
        return self.inner.load(name)

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        if name in self._folded:  # one folded MLP matrix: 2 expert widths x hidden, read whole
            return self.load(name)[index]
        return self.inner.load_slice(name, index)
