"""`corral merge --to gguf`: merge, then convert with corral's HF -> GGUF converter.

The converter reads an HF directory, so the merged checkpoint is staged in full on disk (a
hidden directory beside the output, removed afterwards, also on failure); memory stays
bounded in both steps, disk does not. A streaming path would need the converter to take a
tensor source instead of a directory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.atomic import check_output_path, new_partial


@dataclass
class ChainResult:
    paths: list[str]
    outtype: str
    merged_tensors: int
    name: str
    adapters: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "outtype": self.outtype, "merged_tensors": self.merged_tensors,
                "name": self.name, "adapters": self.adapters, "warnings": self.warnings}


def merge_to_gguf(base: str | Path, adapters: list[Any], out: str | Path, *, weights: list[float] | None = None,
                  dtype: str | None = None, outtype: str = "auto", name: str | None = None,
                  mau_declaration: str | None = None, fix_name: bool = False, force: bool = False,
                  base_model: str | None = None, progress: Progress = NULL_PROGRESS) -> ChainResult:
    from converters.hf_to_gguf import convert_hf_to_gguf
    from toolbox.merge.merge import merge_adapters

    out = Path(out).absolute()
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf with --to gguf")
    check_output_path(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (dtype or "auto").lower() == "auto" and outtype.lower() == "f32":
        dtype = "f32"  # do not round the merged weights to the base's bf16 on the way to an f32 GGUF
    holder = new_partial(out, directory=True, tag="merge-")  # owned: the GGUF step must not take it for stale
    try:
        merged = merge_adapters(base, adapters, holder / "hf", weights=weights, dtype=dtype, name=name,
                                mau_declaration=mau_declaration, fix_name=fix_name, base_model=base_model,
                                progress=progress)
        gres = convert_hf_to_gguf(holder / "hf", out, outtype=outtype, name=merged.name, base_model=base_model,
                                  mau_declaration=mau_declaration, force=force, progress=progress)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return ChainResult([str(p) for p in gres.paths], gres.outtype, len(merged.merged), gres.name or merged.name,
                       merged.adapters, [*merged.warnings, *gres.warnings])
