"""The per-tensor math of weight merges, applied one chunk at a time (mergekit's definitions).

Every method works on chunks of the same elements of every input (`CHUNK` elements in flat order, inside
a piece: an expert slice, a row block or a small tensor), widened to float32 into a worker's preallocated
buffers (`Workspace`) and merged by a chain of in-place torch ops: a chunk of float32 is 1 MiB, so the
chain runs in the core's L2 cache and allocates nothing. What is elementwise (linear, task arithmetic,
TIES's sign election, DARE's masks) is exact per chunk. What mergekit computes over the whole tensor is
gathered in statistics passes first, over the same chunks, and applied in the last pass:

- TIES keeps, per input, the `int(density * numel)` largest |delta| of the whole tensor (mergekit
  `sparsify.magnitude`: an argsort over the flattened tensor, a fused expert tensor being one tensor).
  mergekit ranks |delta| in its compute `dtype`; corral ranks it in the output dtype. A 16-bit |delta|
  (bf16, f16: mergekit subtracts in that dtype) has at most 2**15 values, so one histogram pass gives
  the exact k-th value; a float32 one is found by a two-pass radix select over its bit patterns (16
  high bits, then 16 low bits inside the chosen bin). Elements tied at the threshold are kept in flat
  order (mergekit's argsort picks among equal values in an unspecified order).
- DARE's rescale is the L1 ratio ||delta||_1 / ||masked delta||_1 over the whole tensor (mergekit
  `rescaled_masked_tensor`, RescaleNorm.l1), so the masks are drawn twice from the same seeds.
- SLERP takes one norm and one cosine per whole tensor (mergekit `slerp`: the inputs are reshaped
  to [1, -1] per tensor), model stock one mean cosine of the task vectors per whole tensor
  (`filter_wise: false`, mergekit's default).

The kept values and their sums are float32 whatever the ranking dtype. Where inputs and output are bf16,
the merge pass compares |delta| in float32 against the two float32 bounds of the bf16 threshold
(`_Select.bounds`) in one `hardshrink`, the same elements as the 16-bit keys would keep; masks and
counts are float 0/1 tensors, as torch's comparisons into bool tensors run several times slower.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 18  # elements per step of the op chain: 1 MiB float32 buffers, resident in L2
SLERP_DOT_THRESHOLD = 0.9995  # mergekit: above it the inputs are collinear and interpolated linearly
EPS_NORM = 1e-8  # mergekit slerp: a norm below it counts as 1
EPS_RESCALE = 1e-7  # mergekit rescaled_masked_tensor
HI_BINS = 1 << 15  # |x| has the sign bit clear: a 16-bit |x|, or the high half of a float32 one, is below 2**15
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


class Workspace:
    """One worker's float32 buffers of CHUNK elements, reused for every chunk (no allocation per step)."""

    def __init__(self, n_models: int) -> None:
        import torch

        self.base = torch.empty(CHUNK)
        self.d = [torch.empty(CHUNK) for _ in range(n_models)]
        self.acc, self.div, self.sign, self.tmp, self.flag = (torch.empty(CHUNK) for _ in range(5))
        self.one = torch.ones(CHUNK)
        self.mask = torch.empty(CHUNK)  # float 0/1 masks: torch's comparisons into bool run several times slower
        self._keys: dict[torch.dtype, torch.Tensor] = {}

    def keys(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """A 16-bit buffer of n elements for TIES's ranking keys."""
        import torch

        buf = self._keys.get(dtype)
        if buf is None:
            buf = self._keys[dtype] = torch.empty(CHUNK, dtype=dtype)
        return buf[:n]


class _Select:
    """Exact top-k of |delta| of one input over a whole tensor, streamed: a histogram of 16-bit keys, or a
    radix select on float32 bits (high half, then low half)."""

    def __init__(self, k: int, key16: bool) -> None:
        import torch

        self.k, self.key16 = k, key16
        self.hist = torch.zeros(HI_BINS, dtype=torch.int64)
        self.lo_hist = torch.zeros(LO_BINS if not key16 else 1, dtype=torch.int64)
        self.hi_bin = -1
        self.need = 0  # float32: how many of the chosen high bin belong to the top k
        self.threshold = 0  # key of the k-th largest |delta|
        self.ties_left = 0  # elements equal to the threshold still to keep, in flat order

    def counts(self, kind: str, keys: torch.Tensor) -> torch.Tensor:
        import torch

        if kind == "lo":
            sel = keys[(keys >> 16) == self.hi_bin]
            return torch.bincount(sel & 0xFFFF, minlength=LO_BINS)
        return torch.bincount(keys >> 16 if kind == "hi" else keys, minlength=HI_BINS)[:HI_BINS]

    def absorb(self, kind: str, counts: torch.Tensor) -> None:
        (self.lo_hist if kind == "lo" else self.hist).add_(counts)

    def choose(self, kind: str) -> None:
        if kind == "hi":
            self.hi_bin, self.need, _ = _descend(self.hist, self.k)
            return
        if kind == "lo":
            lo, _, greater = _descend(self.lo_hist, self.need)
            self.threshold, self.ties_left = (self.hi_bin << 16) | lo, self.need - greater
            return
        self.threshold, _, greater = _descend(self.hist, self.k)
        self.ties_left = self.k - greater

    def bounds(self) -> tuple[float, float] | None:
        """(a, b) with key > threshold iff |d| > a and key >= threshold iff |d| > b, for a float32 d whose key is
        its bf16 rounding (round to nearest even: bf16 t holds the float32 values up to the midpoint to t + 1,
        the midpoint itself when t is even); None where that does not hold exactly: a threshold at a bf16
        subnormal (some conversions flush those) or infinity, or NaN deltas (whose keys rank above all)."""
        import numpy as np

        t = self.threshold
        if not self.key16 or not 0x81 <= t < 0x7F80 or bool(self.hist[0x7F81:].any()):
            return None

        def upper(key: int) -> float:
            return float(np.array([(key << 16) | (0x8000 if key % 2 == 0 else 0x7FFF)], np.uint32).view(np.float32)[0])

        return upper(t), upper(t - 1)

    def shrink(self, ws: Workspace, d: torch.Tensor, bounds: tuple[float, float], budget: int) -> int | None:
        """`keep` applied to a float32 delta in place by one hardshrink (`bounds`: see there; dropped elements
        become +0), returning the ties used; or None, d untouched, where the chunk's ties must be ranked."""
        import torch

        lambd, tied = bounds[0], 0
        if budget > 0:
            a = torch.abs(d, out=ws.tmp[:d.numel()])
            mask = ws.mask[:d.numel()]  # float 0/1: its float32 sum of at most CHUNK ones is exact
            tied = int(torch.gt(a, bounds[1], out=mask).sum()) - int(torch.gt(a, bounds[0], out=mask).sum())
            if tied > budget:
                return None
            lambd = bounds[1]
        torch.hardshrink(d, lambd, out=d)
        return tied

    def keep(self, keys: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
        """(mask of kept elements of this chunk, ties used): above the threshold, and the first `budget`
        elements equal to it."""
        import torch

        if budget <= 0:
            return keys > self.threshold, 0
        eq = keys == self.threshold
        tied = int(eq.sum())
        if tied <= budget:  # all of this chunk's ties are kept: no ranking needed
            return keys >= self.threshold, tied
        rank = torch.cumsum(eq, 0, dtype=torch.int32)
        return (keys > self.threshold) | (eq & (rank <= budget)), budget


def _descend(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(bin holding the k-th largest, how many of that bin are needed, how many lie in bins above it)."""
    import numpy as np

    counts = hist.numpy()
    above = np.cumsum(counts[::-1])[::-1]  # above[i]: elements in bins >= i
    idx = int(np.searchsorted(-above, -k, side="right")) - 1  # the last bin whose `above` still reaches k
    greater = int(above[idx] - counts[idx])
    return idx, k - greater, greater


def dare_mask(seed: int, name: str, model: int, offset: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """DARE's keep mask of one chunk: Bernoulli(density) from a generator seeded by seed, tensor, input and
    chunk offset, so a rerun (or the second pass) draws the same mask whatever ran before."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{name}\0{model}\0{offset}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(shape, generator=gen, dtype=torch.float32) < density


def _chunks(lo: int, hi: int) -> range:
    return range(lo, hi, CHUNK)


def spans(numel: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each worker's share of a piece, cut at chunk boundaries: the chunks (and so DARE's
    masks) are the same however many workers share the piece."""
    chunks = -(-numel // CHUNK)
    per = max(1, -(-chunks // parts)) * CHUNK
    return [(lo, min(numel, lo + per)) for lo in range(0, max(numel, 1), per)]


class TensorMerge:
    """One output tensor's merge: `passes` statistics passes (`observe` spans of pieces, `absorb` their
    partial results in flat order, then `end_pass`) and `merge` spans into the output piece.

    `key_dtype` is the dtype TIES ranks |delta| in (16-bit: one histogram pass; else float32 bits, two).
    Spans of one piece may run in worker threads at once, each with its own Workspace: partial results
    are returned, never accumulated in place, so the sums do not depend on the threads' timing.
    """

    def __init__(self, name: str, numel: int, params: MergeParams, key_dtype: torch.dtype | None = None) -> None:
        import torch

        self.name, self.numel, self.p = name, numel, params
        self.spec = SPECS[params.method]
        self.key_dtype = key_dtype if key_dtype in (torch.bfloat16, torch.float16) else None
        n = len(params.weights)
        self.selects: list[_Select | None] = [None] * n
        self.l1 = [[0.0, 0.0] for _ in range(n)]  # DARE: ||delta||_1, ||masked delta||_1
        self.gram = [[0.0] * (n + 1) for _ in range(n + 1)]  # slerp / model stock: dot products
        self.stats: list[str] = []
        self._bounds: list[tuple[float, float] | None] = [None] * n  # per input: _Select.bounds, once chosen
        if self.spec.sparsify == "magnitude":
            for i, dens in enumerate(params.densities):
                if 0 < dens < 1 and numel:
                    self.selects[i] = _Select(max(1, int(dens * numel)), self.key_dtype is not None)
            if any(self.selects):
                self.stats = ["key16"] if self.key_dtype is not None else ["hi", "lo"]
        elif self.spec.sparsify == "random" and params.rescale and any(d < 1 for d in params.densities):
            self.stats = ["l1"]
        elif params.method in ("slerp", "model_stock"):
            self.stats = ["gram"]

    @property
    def passes(self) -> int:
        return len(self.stats)

    def _keys(self, ws: Workspace, d: torch.Tensor | None, m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """TIES's ranking key of |m - b| for one chunk: the 16-bit pattern of |m - b| computed in key_dtype
        (as mergekit subtracts), else the float32 bits of |d|; ordered as the values are. 16-bit keys are
        in a workspace buffer."""
        import torch

        kd = self.key_dtype
        if kd is None:
            assert d is not None
            return d.abs().view(torch.int32)
        # torch subtracts 16-bit floats in float32 and rounds once, so a float32 d of kd inputs rounds to it
        k = ws.keys(kd, m.numel())
        if d is not None and m.dtype == kd and b.dtype == kd:
            k.copy_(d)
        else:
            torch.sub(m.to(kd), b.to(kd), out=k)
        return k.view(torch.int16).bitwise_and_(0x7FFF)

    def observe(self, k: int, ws: Workspace, offset: int, base: torch.Tensor, models: list[torch.Tensor],
                lo: int, hi: int) -> list[list[Any]]:
        """Pass `k`'s statistics of elements [lo, hi) of one piece (flat views; `offset`: the piece's flat
        offset in the tensor): one row per chunk for the float sums (added in flat order by `absorb`, so
        they do not depend on how a piece is split among workers), one summed row for the histograms."""
        import torch

        kind = self.stats[k]
        rows: list[list[Any]] = []
        hist: list[Any] = [None] * len(models)
        for s in _chunks(lo, hi):
            e = min(s + CHUNK, hi)
            b, bf = base[s:e], ws.base[:e - s]
            if kind != "key16":
                bf.copy_(b)
            if kind == "gram":
                vecs = [bf]
                for i, m in enumerate(models):
                    v = ws.d[i][:e - s]
                    if self.p.method == "model_stock":
                        torch.sub(m[s:e], bf, out=v)
                    else:
                        v.copy_(m[s:e])
                    vecs.append(v)
                rows.append([float(torch.dot(vecs[i], vecs[j])) for i in range(len(vecs))
                             for j in range(i, len(vecs))])
                continue
            row = [self._observe_chunk(kind, i, ws, offset + s, m[s:e], b, bf) for i, m in enumerate(models)]
            if kind == "l1":
                rows.append(row)
                continue
            for i, c in enumerate(row):
                if c is not None:
                    hist[i] = c if hist[i] is None else hist[i].add_(c)
        return rows if kind in ("gram", "l1") else [hist]

    def _observe_chunk(self, kind: str, i: int, ws: Workspace, offset: int, m: torch.Tensor, b: torch.Tensor,
                       bf: torch.Tensor) -> Any:
        import torch

        if kind == "l1":
            dens = self.p.densities[i]
            if not 0 < dens < 1:
                return None
            d = torch.sub(m, bf, out=ws.d[i][:m.numel()]).abs_()
            mask = dare_mask(self.p.seed, self.name, i, offset, (m.numel(),), dens)
            return [float(d.sum(dtype=torch.float64)), float(d.mul_(mask).sum(dtype=torch.float64))]
        sel = self.selects[i]
        if sel is None:
            return None
        d = None if kind == "key16" else torch.sub(m, bf, out=ws.d[i][:m.numel()])
        return sel.counts(kind, self._keys(ws, d, m, b))

    def absorb(self, k: int, rows: list[list[Any]]) -> None:
        """Add one span's statistics (spans, and their rows, in flat order)."""
        kind = self.stats[k]
        n = len(self.gram)
        for row in rows:
            if kind == "gram":
                pairs = iter(row)
                for i in range(n):
                    for j in range(i, n):
                        self.gram[i][j] += next(pairs)
                continue
            for i, part in enumerate(row):
                if part is None:
                    continue
                if kind == "l1":
                    self.l1[i][0] += part[0]
                    self.l1[i][1] += part[1]
                else:
                    self.selects[i].absorb(kind, part)  # type: ignore[union-attr]

    def end_pass(self, k: int) -> None:
        for sel in self.selects:
            if sel is not None:
                sel.choose(self.stats[k])
        if k == self.passes - 1:
            self._bounds = [sel.bounds() if sel is not None else None for sel in self.selects]

    def spend(self, used: list[int]) -> None:
        """Ties kept by one piece's merge: fewer remain for the pieces after it."""
        for sel, u in zip(self.selects, used, strict=True):
            if sel is not None:
                sel.ties_left -= u

    def tie_budgets(self) -> list[int]:
        """Per input, how many elements tied at its TIES threshold are still to keep (flat order)."""
        return [sel.ties_left if sel is not None else 0 for sel in self.selects]

    def count_ties(self, ws: Workspace, base: torch.Tensor, models: list[torch.Tensor], lo: int, hi: int,
                   which: list[int]) -> list[int]:
        """Elements of [lo, hi) of a piece tied at each listed input's threshold (for a later span's budget)."""
        import torch

        counts = [0] * len(models)
        for s in _chunks(lo, hi):
            e = min(s + CHUNK, hi)
            bf = ws.base[:e - s]
            if self.key_dtype is None:
                bf.copy_(base[s:e])
            for i in which:
                sel = self.selects[i]
                assert sel is not None
                m = models[i][s:e]
                d = None if self.key_dtype is not None else torch.sub(m, bf, out=ws.d[i][:e - s])
                keys = self._keys(ws, d, m, base[s:e])
                counts[i] += int(torch.eq(keys, sel.threshold, out=ws.mask[:e - s]).sum())  # float 0/1: exact
        return counts

    def merge(self, ws: Workspace, offset: int, base: torch.Tensor, models: list[torch.Tensor], out: torch.Tensor,
              lo: int, hi: int, budgets: list[int]) -> list[int]:
        """Write the merged elements [lo, hi) of one piece into `out` (flat views, out in the output dtype);
        `budgets`: ties each input may still keep. Returns the ties each input kept."""
        import torch

        used = [0] * len(models)
        for s in _chunks(lo, hi):
            e = min(s + CHUNK, hi)
            bf = ws.base[:e - s]
            bf.copy_(base[s:e])
            chunk = [m[s:e] for m in models]
            left = [b - u for b, u in zip(budgets, used, strict=True)]
            result, plus_base = self._merge_chunk(ws, offset + s, base[s:e], bf, chunk, left, used)
            if plus_base:  # the delta methods: the base added as the float32 sum is stored in the output dtype
                torch.add(result, bf, out=out[s:e])
            else:
                out[s:e].copy_(result)
        return used

    def _merge_chunk(self, ws: Workspace, offset: int, b: torch.Tensor, bf: torch.Tensor, models: list[torch.Tensor],
                     left: list[int], used: list[int]) -> tuple[torch.Tensor, bool]:
        """The merged float32 chunk (a view of a workspace buffer), and whether the base chunk `bf` (`b` in
        float32) is still to be added to it."""
        import torch

        n, method, p = bf.numel(), self.p.method, self.p
        acc = ws.acc[:n]
        if method == "linear":
            acc.zero_()
            for i, (m, w) in enumerate(zip(models, p.weights, strict=True)):
                acc.add_(ws.d[i][:n].copy_(m), alpha=w)
            return (acc.div_(sum(p.weights)) if p.normalize else acc), False
        if method == "slerp":
            ca, cb = self._slerp_coefficients()
            torch.mul(bf, ca, out=acc)
            return acc.add_(ws.d[0][:n].copy_(models[0]).mul_(cb)), False
        if method == "model_stock":
            t = self._stock_t()
            acc.copy_(models[0])
            for i, m in enumerate(models[1:], 1):
                acc.add_(ws.d[i][:n].copy_(m))
            acc.div_(len(models)).mul_(t)
            return acc.add_(torch.mul(bf, 1 - t, out=ws.tmp[:n])), False
        deltas = [self._delta(ws, i, offset, m, b, bf, left, used) for i, m in enumerate(models)]
        if self.spec.consensus:
            self._elect(ws, deltas)
        else:
            acc.copy_(deltas[0])
            for d in deltas[1:]:
                acc.add_(d)
            if p.normalize:
                total = sum(p.weights)
                acc.div_(1.0 if abs(total) < 1e-8 else total)
        return acc, True

    def _delta(self, ws: Workspace, i: int, offset: int, m: torch.Tensor, b: torch.Tensor, bf: torch.Tensor,
               left: list[int], used: list[int]) -> torch.Tensor:
        """Input i's weighted, sparsified delta of one chunk (in its workspace buffer)."""
        import torch

        d = torch.sub(m, bf, out=ws.d[i][:bf.numel()])
        dens, sel = self.p.densities[i], self.selects[i]
        if self.spec.sparsify and dens <= 0:
            d.zero_()
        elif self.spec.sparsify == "magnitude" and sel is not None:
            bounds = self._bounds[i]
            # bf16 keys of bf16 inputs compare as float32 bounds; the dropped elements then become +0 where
            # d * mask gives -0 for negative ones: TIES's election counts a zero for no sign and sums only
            # agreeing deltas, so the merged values are the same
            took = None
            if bounds is not None and m.dtype == self.key_dtype == b.dtype == torch.bfloat16:
                took = sel.shrink(ws, d, bounds, left[i])
            if took is None:
                mask, took = sel.keep(self._keys(ws, d, m, b), left[i])
                d.mul_(mask)
            used[i] += took
        elif self.spec.sparsify == "random" and dens < 1:
            d.mul_(dare_mask(self.p.seed, self.name, i, offset, (d.numel(),), dens))
            before, after = self.l1[i]
            if self.p.rescale and before >= EPS_RESCALE and after >= EPS_RESCALE:
                d.mul_(before / after)
        return d.mul_(self.p.weights[i])

    def _elect(self, ws: Workspace, deltas: list[torch.Tensor]) -> None:
        """TIES's sign election into ws.acc: the sum of the deltas agreeing with the majority sign of their
        sum (ties to +), divided by the agreeing weights when normalizing (mergekit get_mask "sum")."""
        import torch

        n = deltas[0].numel()
        acc, div, sign, tmp, flag = ws.acc[:n], ws.div[:n], ws.sign[:n], ws.tmp[:n], ws.flag[:n]
        if len(deltas) > 1:
            torch.add(deltas[0], deltas[1], out=acc)
        else:
            acc.copy_(deltas[0])
        for d in deltas[2:]:
            acc.add_(d)
        # +1 where the sum is >= 0, else -1 (a sum of -0.0 only comes from all-zero deltas, which agree with
        # neither sign); d * sign > 0 is "sign(d) == majority" with sign(0) = 0 agreeing with nothing
        torch.copysign(ws.one[:n], acc, out=sign)
        acc.zero_()
        div.zero_()
        for d, w in zip(deltas, self.p.weights, strict=True):
            torch.gt(torch.mul(d, sign, out=tmp), 0, out=flag)
            acc.addcmul_(d, flag)
            if self.p.normalize:
                div.add_(flag, alpha=w)
        if self.p.normalize:
            acc.div_(div.add_(torch.eq(div, 0, out=flag)))  # a divisor of 0 counts as 1

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
