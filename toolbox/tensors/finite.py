"""Writers refuse to create non-finite values: a cast that overflows is an error, not a silent Inf.

bf16 and f32 weights above 65504 become Inf in f16; f32 values near 3.4e38 round to Inf in bf16.
A writer that casts calls `check_cast(src, out)`; when `out` holds Inf/NaN and `src` holds none,
it raises NonFiniteError (BadInputError, exit 3) and the writer's partial output is removed.
Values that were already NaN/Inf in the source are carried unchanged, not refused: `corral
verify --deep` reports them (codes deep.nan, deep.inf) where they came from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolbox.errors import BadInputError

if TYPE_CHECKING:
    import torch

# largest finite magnitude of each float type a writer casts to
FLOAT_RANGE = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.7977e308}


class NonFiniteError(BadInputError):
    """An encoding or cast turned finite values into Inf/NaN; `for_tensor` adds the tensor's name."""

    def for_tensor(self, name: str, file: str | None = None) -> NonFiniteError:
        """The same error naming the tensor (and the output file being written)."""
        where = f"{file}: " if file else ""
        return NonFiniteError(f"{where}tensor {name}: {self.message}", hint=self.hint, path=self.path or file)


def can_overflow(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting floats of `src` to `dst` can turn a finite value into Inf."""
    s, d = str(src).removeprefix("torch."), str(dst).removeprefix("torch.")
    return s in FLOAT_RANGE and d in FLOAT_RANGE and FLOAT_RANGE[d] < FLOAT_RANGE[s]


def check_cast(src: torch.Tensor, out: torch.Tensor, *, name: str | None = None, file: str | None = None) -> None:
    """NonFiniteError when `out` (the cast of `src`) holds Inf/NaN that `src` does not; `name` and `file`
    (the tensor and the file it comes from) go into the message."""
    import torch

    if not can_overflow(src.dtype, out.dtype) or bool(torch.isfinite(out).all()):
        return
    if not bool(torch.isfinite(src).all()):
        return  # already non-finite in the source: carried, not created
    kind = str(out.dtype).removeprefix("torch.")
    raise overflow(f"casting to {kind} overflows to Inf ({kind} holds magnitudes up to {FLOAT_RANGE[kind]:.6g})",
                   src, name, file)


def cast_checked(t: torch.Tensor, dtype: torch.dtype, name: str, file: str | None = None) -> torch.Tensor:
    """`t` in `dtype`; NonFiniteError naming `name` (and `file`) when the cast overflows finite values to Inf."""
    out = t.to(dtype)
    check_cast(t, out, name=name, file=file)
    return out


def overflow(what: str, src: torch.Tensor, name: str | None, file: str | None = None) -> NonFiniteError:
    """The error for `src`, with its largest magnitude (computed only here, on the error path)."""
    prefix = (f"{file}: " if file else "") + (f"tensor {name}: " if name else "")
    return NonFiniteError(f"{prefix}{what}; its largest magnitude is {float(src.abs().max()):.6g}",
                          hint="write it as bf16 or f32, or fix the source weights", path=file)
