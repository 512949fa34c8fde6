"""One canonical view of every Llama 4 safetensors layout.

- Fused experts (transformers' layout) pass through: `experts.gate_up_proj` [E, H, 2I],
  `experts.down_proj` [E, I, H], stored [in, out].
- Per-expert experts (`experts.{e}.{gate,up,down}_proj.weight`, [out, in], as in quantized
  releases) are presented as the fused tensors; a slice for expert e is assembled from that
  expert's tensors only (gate_up[e] = [gate_e.T | up_e.T], down[e] = down_e.T).
- FP8 weights (float8_e4m3fn with a `weight_scale` per output row, as in the Maverick FP8
  release) are dequantized on read to bf16 and their scale tensors hidden.
- compressed-tensors checkpoints (a `quantization_config` with `quant_method: compressed-tensors`)
  are dequantized module by module first (`toolbox.tensors.compressed`); see `hf_view`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorruptFileError
from toolbox.tensors.source import SourceView, TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

_PER_EXPERT = re.compile(r"^(?P<base>.*\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


def hf_view(inner: TensorSource, config: dict[str, Any] | None = None) -> CanonicalView:
    """The canonical view of an HF checkpoint's tensors; `config` (its config.json) says whether a
    compressed-tensors layer goes underneath."""
    from toolbox.tensors.compressed import CompressedTensorsView, compressed_tensors_config

    qc = compressed_tensors_config(config)
    return CanonicalView(CompressedTensorsView(inner, qc) if qc is not None else inner)


class CanonicalView(SourceView):
    def __init__(self, inner: TensorSource) -> None:
        self.inner = inner
        self.path = inner.path
        raw = inner.infos()
        self._scales: dict[str, str] = {}
        for name, info in raw.items():
            if info.dtype in _FP8 and name.endswith(".weight"):
                stem = name.removesuffix("weight")
                scale = next((stem + s for s in SCALE_SUFFIXES if stem + s in raw), None)
                if scale is None:
                    raise CorruptFileError(f"{inner.path}: FP8 tensor {name!r} has no weight_scale", path=inner.path)
                self._scales[name] = scale
        hidden = set(self._scales.values())
        groups: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
        for name in raw:
            m = _PER_EXPERT.match(name)
            if m:
                groups[m["base"]][int(m["e"])][m["proj"]] = name
        self._fused: dict[str, tuple[str, list[dict[str, str]]]] = {}
        infos: dict[str, TensorInfo] = {}
        emitted: set[str] = set()
        for name, info in raw.items():
            if name in hidden:
                continue
            m = _PER_EXPERT.match(name)
            if m is None:
                infos[name] = self._dequant_info(info)
                continue
            base = m["base"]
            if base in emitted:
                continue
            emitted.add(base)
            experts = groups[base]
            n = len(experts)
            if sorted(experts) != list(range(n)) or any(set(p) != {"gate", "up", "down"} for p in experts.values()):
                raise CorruptFileError(f"{inner.path}: per-expert tensors under {base} are incomplete", path=inner.path)
            parts = [experts[e] for e in range(n)]
            gate = self._dequant_info(raw[parts[0]["gate"]])
            down = self._dequant_info(raw[parts[0]["down"]])
            inter, hidden_size = gate.shape
            gu_name, dn_name = f"{base}.gate_up_proj", f"{base}.down_proj"
            infos[gu_name] = TensorInfo(gu_name, (n, hidden_size, 2 * inter), gate.dtype)
            infos[dn_name] = TensorInfo(dn_name, (n, inter, hidden_size), down.dtype)
            self._fused[gu_name] = ("gate_up", parts)
            self._fused[dn_name] = ("down", parts)
        self._infos = infos

    @property
    def per_expert(self) -> bool:
        return bool(self._fused)

    @property
    def fp8(self) -> bool:
        return bool(self._scales)

    def _dequant_info(self, info: TensorInfo) -> TensorInfo:
        return TensorInfo(info.name, info.shape, "BF16") if info.name in self._scales else info

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _raw(self, name: str) -> torch.Tensor:
        import torch

        t = self.inner.load(name)
        scale_name = self._scales.get(name)
        if scale_name is None:
            return t
        scale = self.inner.load(scale_name).float()
        if scale.dim() == 1 and t.dim() == 2 and scale.numel() == t.shape[0]:
            scale = scale[:, None]
        return (t.float() * scale).to(torch.bfloat16)

    def _expert(self, name: str, e: int) -> torch.Tensor:
        import torch

        kind, parts = self._fused[name]
        p = parts[e]
        if kind == "gate_up":
            return torch.cat([self._raw(p["gate"]).T, self._raw(p["up"]).T], dim=1).contiguous()
        return self._raw(p["down"]).T.contiguous()

    def load(self, name: str) -> torch.Tensor:
        import torch

        if name in self._fused:
            return torch.stack([self._expert(name, e) for e in range(self._infos[name].shape[0])])
        return self._raw(name)

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        if name in self._fused:
            n = self._infos[name].shape[0]
            if isinstance(index, int):
                return self._expert(name, index % n if index < 0 else index)
            return torch.stack([self._expert(name, e) for e in range(*index.indices(n))])
        if name in self._scales:
            scale = self._row_scale(name)
            if scale is None:  # a layout other than per-row or per-tensor: dequantize whole, then slice
                return self._raw(name)[index]
            t = self.inner.load_slice(name, index)  # only the requested rows are read
            s = scale if scale.numel() == 1 else scale[index]
            return (t.float() * s.reshape(s.shape + (1,) * (t.dim() - s.dim()))).to(torch.bfloat16)
        return self.inner.load_slice(name, index)

    def _row_scale(self, name: str) -> torch.Tensor | None:
        """The FP8 scale of `name` as a per-row vector (or a one-element tensor), else None."""
        scale = self.inner.load(self._scales[name]).float()
        rows = self.inner.infos()[name].shape[0] if self.inner.infos()[name].shape else 1
        if scale.numel() == 1:
            return scale.reshape(1)
        if scale.shape[0] == rows and scale.numel() == rows:
            return scale.reshape(rows)
        return None
