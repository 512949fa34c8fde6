"""Chains into GGUF without staging: `corral merge --to gguf`, `corral experts prune --to gguf`.

The operation's result is a tensor source (a view over the input that merges or prunes each piece when the
converter reads it), handed to corral's HF -> GGUF converter as a `toolbox.reference.DerivedModel`. No HF
copy of the result is written: besides the GGUF, only config.json and the tokenizer files land on disk (a
hidden directory beside the output, removed afterwards, also on failure). Memory stays one expert slice.
The GGUF equals, byte for byte, the conversion of the HF checkpoint the operation would have written, its
stamp included (the operation and the inputs' hashes, then the conversion); provenance names the chain's
input as the source.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions
from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.atomic import check_output_path, new_partial

if TYPE_CHECKING:
    from converters.hf_to_gguf import GGUFResult
    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorSource


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


def gguf_output(out: str | Path, *, force: bool) -> Path:
    """The absolute .gguf output path, checked before any work (UsageError for another suffix)."""
    out = Path(out).absolute()
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf with --to gguf")
    check_output_path(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def take_quant(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The per-tensor and imatrix options among `kwargs` (the keywords of `toolbox.convert.gguf_quant_options`
    after `outtype`), removed from it: how prune/extract take them beside their license keywords."""
    import inspect

    from toolbox.convert import gguf_quant_options

    keys = [p.name for p in inspect.signature(gguf_quant_options).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


def check_quant(to: str, outtype: str, quant: dict[str, Any]) -> None:
    """Per-tensor options validated before any work: with a GGUF output as `corral convert` checks them, and
    refused without one (they would be ignored)."""
    if to == "gguf":
        from toolbox.convert import gguf_quant_options

        gguf_quant_options(outtype, **quant)
        return
    given = sorted(k for k, v in quant.items() if v)
    if given:
        flags = ", ".join("--tensor-type" if k == "tensor_types" else "--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags}: per-tensor GGUF options need a GGUF output", hint="add --to gguf (-o FILE.gguf)")


def checked_output(to: str, outtype: str, out: str | Path, quant: dict[str, Any], *, shards: Any,
                   force: bool) -> Path:
    """The absolute output path of a prune or extract, with its target, per-tensor options and shard selection
    checked before anything is read (a bad type, pattern or combination fails first)."""
    if to not in ("hf", "gguf"):
        raise UsageError(f"unknown --to {to!r}", hint="choose hf or gguf")
    check_quant(to, outtype, quant)
    if to == "gguf" and shards is not None:
        raise UsageError("shards= applies to an HF output; a GGUF output is split with split_max_size")
    path = gguf_output(out, force=force) if to == "gguf" else Path(out).absolute()
    check_output_path(path, force=force)
    return path


def derived_to_gguf(origin: ResolvedModel, config: dict[str, Any], tensors: Callable[[], TensorSource],
                    out: Path, *, tag: str, license_options: LicenseOptions, force: bool = False,
                    progress: Progress = NULL_PROGRESS, outtype: str = "auto", **quant: Any) -> GGUFResult:
    """Convert the model whose tensors `tensors` opens and whose config is `config` (tokenizer files taken from
    `origin`, the chain's input) to the GGUF `out`. `outtype` may name a built-in dynamic mix; `quant` are
    `toolbox.convert.gguf_quant_options`' per-tensor and imatrix options, expanded as `corral convert` does."""
    from converters.hf_to_gguf import convert_hf_to_gguf
    from toolbox.convert import gguf_quant_options
    from toolbox.hf_output import write_model_files
    from toolbox.reference import DerivedModel, ModelReference

    convert = gguf_quant_options(outtype, **quant)  # validated before anything is written
    holder = new_partial(out, directory=True, tag=tag)  # owned: the GGUF step must not take it for stale
    try:
        write_model_files(holder, origin.directory, config)
        model = DerivedModel(ModelReference(origin.label, "path"), holder, tensors=tensors)
        return convert_hf_to_gguf(model, out, license_options=license_options, force=force, progress=progress,
                                  **convert)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def merge_to_gguf(base: str | Path, adapters: list[Any], out: str | Path, *, weights: list[float] | None = None,
                  dtype: str | None = None, outtype: str = "auto", name: str | None = None,
                  mau_declaration: str | None = None, fix_name: bool = False, force: bool = False,
                  base_model: str | None = None, progress: Progress = NULL_PROGRESS, **quant: Any) -> ChainResult:
    """Merge LoRA adapters into `base` and write the result as a GGUF of `outtype` (a ggml type, a llama.cpp mix
    or a built-in dynamic mix; `quant`: the per-tensor and imatrix options of `corral convert`), streamed: each
    merged piece goes from the merge straight into the quantizer (see the module docstring)."""
    from toolbox.convert import gguf_quant_options
    from toolbox.merge.merged_source import merged_config, open_merged

    out = gguf_output(out, force=force)
    gguf_quant_options(outtype, **quant)  # a bad type or pattern fails before the adapters are read
    if (dtype or "auto").lower() == "auto" and outtype.lower() == "f32":
        dtype = "f32"  # do not round the merged weights to the base's bf16 on the way to an f32 GGUF
    opts = LicenseOptions(name=name, mau_declaration=mau_declaration, fix_name=fix_name, base_model=base_model)
    merged = open_merged(base, adapters, weights=weights, dtype=dtype, license_options=opts, progress=progress)
    try:
        gguf_opts = LicenseOptions(name=merged.prep.stamp.name, mau_declaration=mau_declaration,
                                   base_model=base_model)
        gres = derived_to_gguf(merged.prep.model, merged_config(merged), lambda: merged, out, tag="merge-",
                               license_options=gguf_opts, force=force, progress=progress, outtype=outtype,
                               **quant)
        reports = merged.reports()
    finally:
        merged.close()
    from toolbox.merge.merge import lossy_warnings

    warnings = lossy_warnings(reports)
    unread = merged.unread()
    if unread:
        warnings.append(f"{len(unread)} merged tensors are not part of a GGUF (first: {unread[0]}); "
                        "merge --to hf keeps them")
    return ChainResult([str(p) for p in gres.paths], gres.outtype, len(reports), gres.name or merged.prep.stamp.name,
                       merged.prep.described, [*warnings, *gres.warnings])
