"""One matrix to LoRA factors by truncated SVD, with the numbers that say how much was kept.

For a difference D [out, in] (float32) and rank r, the factors are B = U_r sqrt(S_r) / sqrt(s) and
A = sqrt(S_r) Vh_r / sqrt(s), so that PEFT's delta `B @ A * s` (s = alpha / r) is the rank-r truncation of
D; the singular values are split evenly so both factors have the same scale (as PiSSA does), which keeps
bf16 factors in range. By the Eckart-Young theorem that truncation is the best rank-r approximation in the
Frobenius norm.

`full` is LAPACK's SVD (`torch.linalg.svd`): exact, O(m n min(m, n)). `randomized` is Halko et al.'s
range finder with power iterations (`torch.svd_lowrank`), O(m n q) for q = rank + oversampling: what makes
a 5120 x 16384 expert slice take a fraction of a second rather than a minute. Its Gaussian test matrix
is drawn from a generator seeded per tensor and slice, so a rerun writes the same bytes.

The error is measured on the factors as stored (after rounding to the output dtype), not derived from
the singular values, so the report holds for the file that is written.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

SvdMethod = Literal["auto", "full", "randomized"]
FULL_MAX_DIM = 256  # auto: LAPACK's exact SVD up to this smaller dimension, the randomized one above
OVERSAMPLE = 10  # extra random directions of the range finder (Halko et al. recommend 5-10)
POWER_ITERATIONS = 4  # subspace iterations: sharpen the range when the spectrum decays slowly


@dataclass
class Energy:
    """Sums of squares over one tensor (all its expert slices): the delta, the kept part, the residual."""

    total: float = 0.0
    kept: float = 0.0
    error: float = 0.0

    def add(self, other: Energy) -> None:
        self.total += other.total
        self.kept += other.kept
        self.error += other.error

    @property
    def retained(self) -> float:
        """Sum of the kept singular values squared over ||D||_F^2 (1 for a zero difference)."""
        return min(1.0, self.kept / self.total) if self.total > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """||D - B A s||_F / ||D||_F of the stored factors (0 for a zero difference)."""
        return math.sqrt(self.error / self.total) if self.total > 0 else 0.0


def slice_seed(name: str, index: int) -> int:
    """A stable seed for the randomized SVD of one tensor (or expert slice of it)."""
    return zlib.crc32(f"{name}#{index}".encode()) & 0x7FFFFFFF


def truncated_svd(d: torch.Tensor, rank: int, method: SvdMethod, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(U_r [m, r], S_r [r], Vh_r [r, n]) of a float32 matrix."""
    import torch

    m, n = d.shape
    small = min(m, n)
    q = min(small, rank + OVERSAMPLE)
    if method == "full" or (method == "auto" and (small <= FULL_MAX_DIM or 2 * q >= small)):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator: seed it, restore it
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=q, niter=POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank].T


def factorize(d: torch.Tensor, rank: int, scale: float, dtype: torch.dtype, method: SvdMethod,
              seed: int) -> tuple[torch.Tensor, torch.Tensor, Energy]:
    """LoRA factors (B [m, r], A [r, n], in `dtype`) with B @ A * scale the rank-r truncation of `d`, and the
    energies of `d`, of the kept singular values and of the stored factors' residual."""
    import torch

    u, s, vh = truncated_svd(d, rank, method, seed)
    root = torch.sqrt(s / scale)
    b = (u * root).to(dtype)
    a = (vh * root[:, None]).to(dtype)
    flat = d.reshape(-1)
    total = float(torch.dot(flat, flat))
    kept = float(torch.dot(s, s))
    residual = torch.addmm(d, b.float(), a.float(), alpha=-scale).reshape(-1)  # d - B A s, one pass
    return b.contiguous(), a.contiguous(), Energy(total, kept, float(torch.dot(residual, residual)))
