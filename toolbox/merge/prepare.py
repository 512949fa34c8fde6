"""What every LoRA merge does before its first tensor: the arguments checked, the base resolved and opened,
the adapters opened and labelled, the plan of which adapter key lands on which base tensor, and the stamp.

Shared by `merge_adapters` (which writes an HF checkpoint) and `toolbox.merge.merged_source` (which serves
the merged tensors to a converter without writing them), so both refuse the same inputs and stamp alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions, Stamp, StampInput, derive_stamp
from toolbox.errors import UsageError
from toolbox.merge.adapter import Adapter, load_adapter
from toolbox.merge.plan import MergePlan, build_plan
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike
from toolbox.tensors.dtypes import HF_OUT_DTYPES

if TYPE_CHECKING:
    from toolbox.checkpoint import Llama4Checkpoint
    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorSource


def check_merge_args(adapters: list[Any], weights: list[float] | None, dtype: str | None
                     ) -> tuple[list[float], str, str | None]:
    """(one finite weight per adapter, the --dtype key, the output safetensors dtype or None for auto);
    UsageError (exit 2) before anything is read."""
    if not adapters:
        raise UsageError("no adapter to merge", hint="pass one or more PEFT adapter directories")
    weights = [1.0] * len(adapters) if weights is None or len(weights) == 0 else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weights for {len(adapters)} adapters",
                         hint="give --weight once per adapter, in the same order, or not at all")
    if any(not math.isfinite(w) for w in weights):
        raise UsageError("adapter weights must be finite numbers")
    key = (dtype or "auto").lower()
    if key not in HF_OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, f16 or f32")
    return weights, key, HF_OUT_DTYPES[key]


@dataclass
class PreparedMerge:
    """An opened merge: the caller reads `source` through `plan` and must `close()` it."""

    model: ResolvedModel
    loaded: list[Adapter]
    weights: list[float]
    requested: str | None  # the output safetensors dtype of float tensors; None keeps each tensor's
    source: TensorSource
    plan: MergePlan
    stamp: Stamp
    described: list[dict[str, Any]]

    @property
    def ckpt(self) -> Llama4Checkpoint:
        return self.model.checkpoint

    def close(self) -> None:
        self.source.close()
        for a in self.loaded:
            a.close()


def prepare_merge(base: ModelLike, adapters: list[str | Path | Adapter], *, weights: list[float], key: str,
                  requested: str | None, opts: LicenseOptions, progress: Progress = NULL_PROGRESS) -> PreparedMerge:
    """Resolve the base, open it and the adapters, plan the merge and derive its stamp (args from
    `check_merge_args`); every adapter key must land on a base tensor (BadInputError, exit 3)."""
    from toolbox.reference import resolve

    model = resolve(base)
    ckpt = model.checkpoint
    loaded: list[Adapter] = []
    try:
        for a in adapters:
            loaded.append(_open_adapter(a, progress))
        seen: set[str] = set()
        for i, a in enumerate(loaded):  # labels key the provenance: unique, even for two directories named alike
            a.label = a.label or f"adapter{i}"
            if a.label in seen:
                a.label = f"{a.label}#{i}"
            seen.add(a.label)
        source = model.open_source()
    except BaseException:
        for a in loaded:
            a.close()
        raise
    try:
        plan = build_plan(loaded, weights, source.infos(), ckpt.family)
        stamp, described = merge_stamp(model.stamp_input(source), ckpt, loaded, weights, plan, opts, key)
    except BaseException:
        source.close()
        for a in loaded:
            a.close()
        raise
    return PreparedMerge(model, loaded, weights, requested, source, plan, stamp, described)


def _open_adapter(spec: str | Path | Adapter, progress: Progress) -> Adapter:
    """An Adapter from a directory, or from a Hub repo id (fetched through corral's downloader)."""
    from toolbox.merge.fetch import fetch_adapter, is_repo_id

    if isinstance(spec, Adapter):
        return spec
    if is_repo_id(spec):
        directory, origin = fetch_adapter(str(spec), progress=progress)
        adapter = load_adapter(directory)
        adapter.label, adapter.origin = str(spec), origin
        return adapter
    return load_adapter(spec)


def merge_stamp(inp: StampInput, ckpt: Any, loaded: list[Adapter], weights: list[float], plan: MergePlan,
                opts: LicenseOptions, dtype: str) -> tuple[Stamp, list[dict[str, Any]]]:
    """The license stamp: relation finetune (one adapter) or merge (several), adapters with hashes in provenance."""
    described = []
    sources: dict[str, str] = {}
    for i, (a, w) in enumerate(zip(loaded, weights, strict=True)):
        d = a.describe()
        d["weight"] = w
        d["expert_layout"] = plan.layouts.get(i)
        d["tensors"] = sum(1 for cs in plan.by_base.values() for c in cs if c.adapter == i)
        described.append(d)
        for filename, digest in a.sha256.items():
            sources[f"{a.label}/{filename}"] = f"sha256:{digest}"
    op = {"op": "merge", "method": "lora", "dtype": dtype,
          "adapters": [{"name": d["label"], "weight": d["weight"], "sha256": d["sha256"]["adapter_model.safetensors"],
                        "peft_version": d["peft_version"], "expert_layout": d["expert_layout"],
                        **({"origin": d["origin"]} if d["origin"] else {})} for d in described]}
    from_adapter = next((a.base_model_name for a in loaded
                         if a.base_model_name and _looks_like_repo(a.base_model_name)), None)
    stamp = derive_stamp(inp, op, opts, suffix="merged", multimodal=ckpt.multimodal,
                         relation="finetune" if len(loaded) == 1 else "merge", sources=sources,
                         base_model=inp.origin.get("base_model") or from_adapter)
    return stamp, described


def _looks_like_repo(text: str) -> bool:
    from toolbox.reference import is_hub_id

    return is_hub_id(text)
