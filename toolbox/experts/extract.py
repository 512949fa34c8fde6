"""Dense extraction: each MoE layer's shared expert and one routed expert folded into one MLP of
width 2x the expert width, so the result is a dense Llama 4 text stack transformers loads.

It equals the MoE with the router forced to that expert at score 1 (Llama 4 scales the expert input),
because SiLU(gate) * up is computed per hidden unit and the down projection sums over them:
stacking the two MLPs' units side by side adds their outputs."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.errors import UnsupportedModelError, UsageError
from toolbox.experts.output import Planned, copy_tensor, make_stamp, plan_shard_count, text_config, write_checkpoint
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike

_FF = re.compile(r"\.layers\.(\d+)\.feed_forward\.(.+)$")


@dataclass
class ExtractResult:
    path: Path
    experts: dict[int, int]
    bytes: int
    name: str


def resolve_experts(expert: int | Mapping[int, int], moe_layers: tuple[int, ...], n_experts: int) -> dict[int, int]:
    """One expert for every MoE layer, or {layer: expert} covering each MoE layer exactly."""
    if isinstance(expert, Mapping):
        chosen = {int(k): int(v) for k, v in expert.items()}
        if set(chosen) != set(moe_layers):
            raise UsageError(f"experts given for layers {sorted(chosen)}, the MoE layers are {list(moe_layers)}",
                             hint="give every MoE layer exactly once, or one expert for all")
    else:
        chosen = {layer: int(expert) for layer in moe_layers}
    bad = sorted({e for e in chosen.values() if not 0 <= e < n_experts})
    if bad:
        raise UsageError(f"expert(s) {bad} do not exist (the model has {n_experts}: 0-{n_experts - 1})")
    return chosen


def dense_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the dense result: no MoE layer, every feed-forward of width intermediate_size_mlp."""
    cfg = json.loads(json.dumps(config))
    tc = text_config(cfg)
    tc["moe_layers"] = []
    tc["interleave_moe_layer_step"] = 0
    tc["intermediate_size_mlp"] = 2 * int(tc["intermediate_size"])  # explicit: transformers' default is 16384
    return cfg


def most_used_experts(src: str | Path, calibration: str | Path | None = None, *, stats: Any = None,
                      max_tokens: int = 2048, progress: Progress = NULL_PROGRESS
                      ) -> tuple[dict[int, int], dict[str, Any]]:
    """`--dense auto`: each MoE layer's most used expert (from `stats`, or measured on `calibration`), and the
    provenance entry that records the choice."""
    from toolbox.experts.stats import router_stats

    if stats is None:
        if calibration is None:
            raise UsageError("--dense auto needs --calibration DATA (or --stats FILE)")
        stats = router_stats(src, calibration, max_tokens=max_tokens, progress=progress)
    return stats.most_used(), {"choice": "auto (most used)", "calibration_tokens": stats.tokens}


def extract_dense(src: ModelLike, out: str | Path, *, expert: int | Mapping[int, int], force: bool = False,
                  extra_provenance: dict[str, Any] | None = None, license_options: LicenseOptions | None = None,
                  progress: Progress = NULL_PROGRESS, to: str = "hf", outtype: str = "auto",
                  shards: Collection[int] | None = None, max_shard_bytes: int | None = None,
                  **legacy: Any) -> ExtractResult:
    """Write a dense model: in each MoE layer, [shared expert | routed `expert`] as one MLP.

    `to="gguf"` streams the dense model straight into the GGUF `out` of `outtype` (no HF copy on disk),
    byte for byte the conversion of the HF output. `shards`/`max_shard_bytes` and the per-tensor GGUF keywords in
    `legacy`: as `prune_experts`."""
    from toolbox.experts.output import require_hf
    from toolbox.merge.chain import checked_output, take_quant
    from toolbox.reference import resolve

    require_hf(src)
    quant = take_quant(legacy)
    opts = LicenseOptions.of(license_options, **legacy)
    out = checked_output(to, outtype, out, quant, shards=shards, force=force)
    model = resolve(src)
    src_dir, ckpt = model.path, model.checkpoint
    t = ckpt.text
    if not t.moe_layers:
        raise UsageError("this model has no MoE layer: it is dense already")
    if t.dense_width != 2 * t.expert_width:
        raise UnsupportedModelError(f"intermediate_size_mlp {t.dense_width} is not twice the expert width "
                                    f"{t.expert_width}: a folded layer would not match the dense layers")
    chosen = resolve_experts(expert, t.moe_layers, t.experts)
    op = {"op": "extract-dense", "experts": {str(k): v for k, v in sorted(chosen.items())},
          **(extra_provenance or {})}
    source = model.open_source()
    try:
        stamp = make_stamp(model, source, op, suffix="dense", options=opts)
        if to == "gguf":
            from toolbox.experts.dense_source import DenseSource
            from toolbox.merge.chain import derived_to_gguf

            dense = DenseSource(source, chosen, t.expert_width, t.hidden, stamp)
            cfg = dense_config(ckpt.config)
            cfg.pop("quantization_config", None)  # as write_checkpoint: FP8 sources are dequantized on read
            res = derived_to_gguf(model, cfg, lambda: dense, out, tag="extract-", progress=progress, force=force,
                                  license_options=LicenseOptions(name=stamp.name, mau_declaration=opts.mau_declaration,
                                                                 base_model=opts.base_model), outtype=outtype,
                                  **quant)
            return ExtractResult(out, chosen, res.bytes, stamp.name)
        written = write_checkpoint(out, src_dir, _plan(source, chosen, t), dense_config(ckpt.config), stamp,
                                   force=force, label="extracting", progress=progress, shards=shards,
                                   max_shard_bytes=max_shard_bytes)
    finally:
        source.close()
    return ExtractResult(out, chosen, written, stamp.name)


def _plan(source: Any, chosen: dict[int, int], t: Any) -> list[Planned]:
    """Every output tensor in the input's order: each MoE layer's folded MLP where its router was, the rest copied."""
    infos = source.infos()
    plan: list[Planned] = []
    for info in infos.values():
        m = _FF.search(info.name)
        if m is None or int(m[1]) not in chosen:
            plan.append((info.name, info.shape, info.dtype, copy_tensor(source, info)))
            continue
        if m[2] != "router.weight":  # one folded MLP per layer, planned where the router was
            continue
        base = info.name.removesuffix("router.weight")
        e, dtype = chosen[int(m[1])], infos[f"{base}experts.gate_up_proj"].dtype
        for proj, shape in (("gate_proj", (2 * t.expert_width, t.hidden)), ("up_proj", (2 * t.expert_width,
                                                                                       t.hidden)),
                            ("down_proj", (t.hidden, 2 * t.expert_width))):
            plan.append((f"{base}{proj}.weight", shape, dtype, _folded(source, base, proj, e, t.expert_width)))
    return plan


def extract_shard_count(src: ModelLike, *, expert: int | Mapping[int, int], max_shard_bytes: int | None = None) -> int:
    """How many safetensors files `extract_dense` writes with these arguments, from the input's headers alone."""
    from toolbox.reference import resolve

    model = resolve(src)
    t = model.checkpoint.text
    source = model.open_source()
    try:
        return plan_shard_count(_plan(source, resolve_experts(expert, t.moe_layers, t.experts), t), max_shard_bytes)
    finally:
        source.close()


def _folded(source: Any, base: str, proj: str, e: int, width: int) -> Any:
    """Writer callback: shared expert's rows (or columns, for down) then the routed expert's."""
    from toolbox.experts.dense_source import folded

    def emit(writer: Any) -> None:
        writer.write(f"{base}{proj}.weight", folded(source, base, proj, e, width))
    return emit
