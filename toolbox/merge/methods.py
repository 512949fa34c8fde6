"""The per-tensor math of weight merges, applied one block at a time (mergekit's definitions).

Every method works on float32 blocks of the same elements of every input: a row block of a 2-D tensor
or of one expert slice, in flat order. What is elementwise (linear, task arithmetic, TIES's sign
election, DARE's masks) is exact per block. What mergekit computes over the whole tensor is gathered
in statistics passes first, over the same blocks, and applied in the last pass:

- TIES keeps, per input, the `int(density * numel)` largest |delta| of the whole tensor (mergekit
  `sparsify.magnitude`: an argsort over the flattened tensor, a fused expert tensor being one tensor).
  The threshold is found exactly by a two-pass radix select over the float32 bit patterns of |delta|
  (16 high bits, then 16 low bits inside the chosen bin); ties at the threshold are kept in flat
  order (mergekit's argsort picks among equal values in an unspecified order).
- DARE's rescale is the L1 ratio ||delta||_1 / ||masked delta||_1 over the whole tensor (mergekit
  `rescaled_masked_tensor`, RescaleNorm.l1), so the masks are drawn twice from the same seeds.
- SLERP takes one norm and one cosine per whole tensor (mergekit `slerp`: the inputs are reshaped
  to [1, -1] per tensor), model stock one mean cosine of the task vectors per whole tensor
  (`filter_wise: false`, mergekit's default).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SLERP_DOT_THRESHOLD = 0.9995  # mergekit: above it the inputs are collinear and interpolated linearly
EPS_NORM = 1e-8  # mergekit slerp: a norm below it counts as 1
EPS_RESCALE = 1e-7  # mergekit rescaled_masked_tensor
HI_BINS = 1 << 15  # |x| as float32 has the sign bit clear: its high 16 bits are below 2**15
LO_BINS = 1 << 16


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs: mergekit's registry entry for it, as data."""

    name: str
    uses_base: bool
    min_models: int
    max_models: int | None
    sparsify: str | None  # "magnitude" (TIES), "random" (DARE) or None
    consensus: bool  # TIES sign election
    normalize: bool  # the default of `normalize`
    rescale: bool  # the default of `rescale` (DARE)


SPECS = {s.name: s for s in (
    MethodSpec("linear", False, 1, None, None, False, True, False),
    MethodSpec("task_arithmetic", True, 1, None, None, False, False, False),
    MethodSpec("ties", True, 1, None, "magnitude", True, True, False),
    MethodSpec("dare_ties", True, 1, None, "random", True, False, True),
    MethodSpec("dare_linear", True, 1, None, "random", False, False, True),
    MethodSpec("slerp", True, 1, 1, None, False, False, False),
    MethodSpec("model_stock", True, 2, None, None, False, False, False),
)}


@dataclass(frozen=True)
class MergeParams:
    """The parameters of one merge, resolved (one weight and density per model)."""

    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    normalize: bool
    rescale: bool
    t: float = 0.5
    seed: int = 0


class _Select:
    """Exact top-k of |delta| of one input over a whole tensor, streamed: radix select on float32 bits."""

    def __init__(self, k: int) -> None:
        import torch

        self.k = k
        self.hi_hist = torch.zeros(HI_BINS, dtype=torch.int64)
        self.lo_hist = torch.zeros(LO_BINS, dtype=torch.int64)
        self.hi_bin = -1
        self.need = 0  # how many of the chosen high bin belong to the top k
        self.threshold = 0  # bit pattern of the k-th largest |delta|
        self.ties_left = 0  # elements equal to the threshold still to keep, in flat order

    def observe_hi(self, bits: torch.Tensor) -> None:
        import torch

        self.hi_hist += torch.bincount((bits >> 16).reshape(-1), minlength=HI_BINS)[:HI_BINS]

    def choose_hi(self) -> None:
        self.hi_bin, self.need, _ = _descend(self.hi_hist, self.k)

    def observe_lo(self, bits: torch.Tensor) -> None:
        import torch

        sel = bits[(bits >> 16) == self.hi_bin]
        if sel.numel():
            self.lo_hist += torch.bincount(sel & 0xFFFF, minlength=LO_BINS)

    def choose_lo(self) -> None:
        lo, _, greater = _descend(self.lo_hist, self.need)
        self.threshold = (self.hi_bin << 16) | lo
        self.ties_left = self.need - greater

    def keep(self, bits: torch.Tensor) -> torch.Tensor:
        """The mask of kept elements of this block (blocks come in flat order)."""
        import torch

        keep = bits > self.threshold
        eq = bits == self.threshold
        if self.ties_left > 0:
            flat = eq.reshape(-1)
            rank = torch.cumsum(flat, 0, dtype=torch.int64)
            take = flat & (rank <= self.ties_left)
            self.ties_left -= int(take.sum())
            keep |= take.reshape(bits.shape)
        return keep


def _descend(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(bin holding the k-th largest, how many of that bin are needed, how many lie in bins above it)."""
    import numpy as np

    counts = hist.numpy()
    above = np.cumsum(counts[::-1])[::-1]  # above[i]: elements in bins >= i
    idx = int(np.searchsorted(-above, -k, side="right")) - 1  # the last bin whose `above` still reaches k
    greater = int(above[idx] - counts[idx])
    return idx, k - greater, greater


def _abs_bits(d: torch.Tensor) -> torch.Tensor:
    import torch

    return d.abs().view(torch.int32)


def dare_mask(seed: int, name: str, model: int, offset: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """DARE's keep mask of one block: Bernoulli(density) from a generator seeded by seed, tensor, input and
    block offset, so a rerun (or the second pass) draws the same mask whatever ran before."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{name}\0{model}\0{offset}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(shape, generator=gen, dtype=torch.float32) < density


class TensorMerge:
    """One output tensor's merge: `passes` statistics passes (`observe`, then `end_pass`) and `merge`."""

    def __init__(self, name: str, numel: int, params: MergeParams) -> None:
        self.name, self.numel, self.p = name, numel, params
        self.spec = SPECS[params.method]
        n = len(params.weights)
        self.selects: list[_Select | None] = [None] * n
        self.l1 = [[0.0, 0.0] for _ in range(n)]  # DARE: ||delta||_1, ||masked delta||_1
        self.gram = [[0.0] * (n + 1) for _ in range(n + 1)]  # slerp / model stock: dot products
        self.stats: list[str] = []
        if self.spec.sparsify == "magnitude":
            for i, dens in enumerate(params.densities):
                if 0 < dens < 1 and numel:
                    self.selects[i] = _Select(max(1, int(dens * numel)))
            if any(self.selects):
                self.stats = ["hi", "lo"]
        elif self.spec.sparsify == "random" and params.rescale and any(d < 1 for d in params.densities):
            self.stats = ["l1"]
        elif params.method in ("slerp", "model_stock"):
            self.stats = ["gram"]

    @property
    def passes(self) -> int:
        return len(self.stats)

    def observe(self, k: int, offset: int, base: torch.Tensor, models: list[torch.Tensor]) -> None:
        import torch

        kind = self.stats[k]
        if kind == "gram":
            vecs = [base.reshape(-1)] + [(m - base).reshape(-1) if self.p.method == "model_stock"
                                         else m.reshape(-1) for m in models]
            for i in range(len(vecs)):
                for j in range(i, len(vecs)):
                    self.gram[i][j] += float(torch.dot(vecs[i], vecs[j]))
            return
        for i, m in enumerate(models):
            d = m - base
            if kind == "l1":
                dens = self.p.densities[i]
                if 0 < dens < 1:
                    mask = dare_mask(self.p.seed, self.name, i, offset, tuple(d.shape), dens)
                    a = d.abs()
                    self.l1[i][0] += float(a.sum(dtype=torch.float64))
                    self.l1[i][1] += float((a * mask).sum(dtype=torch.float64))
                continue
            sel = self.selects[i]
            if sel is not None:
                (sel.observe_hi if kind == "hi" else sel.observe_lo)(_abs_bits(d))

    def end_pass(self, k: int) -> None:
        for sel in self.selects:
            if sel is not None:
                (sel.choose_hi if self.stats[k] == "hi" else sel.choose_lo)()

    def merge(self, offset: int, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        """The merged float32 block."""
        method = self.p.method
        if method == "linear":
            return self._linear(models)
        if method == "slerp":
            ca, cb = self._slerp_coefficients()
            return base * ca + models[0] * cb
        if method == "model_stock":
            t = self._stock_t()
            avg = sum(models[1:], models[0]) / len(models)
            return avg * t + base * (1 - t)
        return self._task_arithmetic(offset, base, models)

    def _linear(self, models: list[torch.Tensor]) -> torch.Tensor:
        import torch

        out = torch.zeros_like(models[0])
        for m, w in zip(models, self.p.weights, strict=True):
            out.add_(m, alpha=w)
        if self.p.normalize:
            out.div_(sum(self.p.weights))
        return out

    def _task_arithmetic(self, offset: int, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        import torch

        deltas = []
        for i, m in enumerate(models):
            d = m - base
            dens = self.p.densities[i]
            if self.spec.sparsify and dens <= 0:
                d.zero_()
            elif self.spec.sparsify == "magnitude" and self.selects[i] is not None:
                d = d * self.selects[i].keep(_abs_bits(d))  # type: ignore[union-attr]
            elif self.spec.sparsify == "random" and dens < 1:
                d = d * dare_mask(self.p.seed, self.name, i, offset, tuple(d.shape), dens)
                before, after = self.l1[i]
                if self.p.rescale and before >= EPS_RESCALE and after >= EPS_RESCALE:
                    d = d * (before / after)
            deltas.append(d.mul_(self.p.weights[i]))
        weights = self.p.weights
        if self.spec.consensus:
            total = sum(deltas[1:], deltas[0])
            majority = torch.where(total >= 0, 1.0, -1.0)
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for d, w in zip(deltas, weights, strict=True):
                agree = torch.sign(d) == majority
                mixed += d * agree
                divisor += agree * w
            divisor[divisor == 0] = 1
        else:
            mixed = sum(deltas[1:], deltas[0])
            divisor_value = sum(weights)
            divisor = 1.0 if abs(divisor_value) < 1e-8 else divisor_value  # type: ignore[assignment]
        if self.p.normalize:
            mixed = mixed / divisor
        return base + mixed

    def _slerp_coefficients(self) -> tuple[float, float]:
        t = self.p.t
        na, nb = math.sqrt(self.gram[0][0]), math.sqrt(self.gram[1][1])
        na = na if na > EPS_NORM else 1.0
        nb = nb if nb > EPS_NORM else 1.0
        dot = max(-1.0, min(1.0, self.gram[0][1] / (na * nb)))
        if abs(dot) > SLERP_DOT_THRESHOLD:
            return 1 - t, t
        theta = math.acos(dot)
        s = math.sin(theta)
        return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s

    def _stock_t(self) -> float:
        n = len(self.p.weights)
        g = self.gram
        cos = []
        for i in range(1, n + 1):
            for j in range(i + 1, n + 1):
                norm = math.sqrt(g[i][i]) * math.sqrt(g[j][j])
                cos.append(max(-1.0, min(1.0, g[i][j] / max(norm, 1e-6))))
        c = sum(cos) / len(cos)
        denom = 1 + (n - 1) * c
        return 0.0 if abs(denom) < 1e-6 else n * c / denom
