"""Expert pruning: keep the same chosen experts' slices of the router and both expert tensors
in every MoE layer; with sigmoid-of-top-k routing the result is exactly the original with the
dropped experts' router logits at -inf (top-k of sigmoid scores, no softmax renormalisation)."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license.stamp import LicenseOptions
from toolbox.experts.output import Planned, copy_tensor, make_stamp, plan_shard_count, text_config, write_checkpoint
from toolbox.experts.pruned_source import MOE as _MOE
from toolbox.experts.pruned_source import PrunedSource
from toolbox.experts.selection import KeepSpec, resolve_keep
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike


@dataclass
class PruneResult:
    path: Path
    kept: dict[int, list[int]]
    experts_before: int
    experts_after: int
    bytes: int
    name: str
    criterion: str | None = None
    scores: dict[int, list[float]] = field(default_factory=dict)


def prune_experts(src: ModelLike, out: str | Path, *, keep: KeepSpec | None = None, drop: KeepSpec | None = None,
                  criterion: str | None = None, force: bool = False,
                  extra_provenance: dict[str, Any] | None = None, license_options: LicenseOptions | None = None,
                  progress: Progress = NULL_PROGRESS, to: str = "hf", outtype: str = "auto",
                  shards: Collection[int] | None = None, max_shard_bytes: int | None = None,
                  **legacy: Any) -> PruneResult:
    """Write a copy of `src` keeping, in every MoE layer, the experts in `keep` (or all but `drop`).

    `keep`/`drop` is one list for every MoE layer or {layer: list}; the same count must remain in
    every layer and at least num_experts_per_tok. Streams one expert slice at a time.
    `to="gguf"` writes the pruned model straight as the GGUF `out` of `outtype` (no HF copy on disk:
    `toolbox.merge.chain`), byte for byte the conversion of the HF output; `legacy` may also hold `corral
    convert`'s per-tensor and imatrix keywords (tensor_types=, output_tensor_type=, token_embedding_type=,
    pure=, imatrix=, include_weights=, exclude_weights=: `toolbox.convert.gguf_quant_options`).
    `max_shard_bytes` sizes the safetensors files (default 5 GiB); `shards` writes only some of them, or with `()`
    the rest of the directory (`toolbox.experts.output.write_checkpoint`; `prune_shard_count` says how many there
    are)."""
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
    kept = resolve_keep(keep=keep, drop=drop, experts=t.experts, top_k=t.top_k, moe_layers=t.moe_layers)
    n_kept = len(next(iter(kept.values())))
    op: dict[str, Any] = {"op": "prune-experts", "criterion": criterion or ("keep" if keep is not None else "drop"),
                          "experts_before": t.experts, "experts_after": n_kept,
                          "kept": {str(k): v for k, v in sorted(kept.items())}, **(extra_provenance or {})}
    config = json.loads(json.dumps(ckpt.config))
    text_config(config)["num_local_experts"] = n_kept
    source = model.open_source()
    try:
        stamp = make_stamp(model, source, op, suffix=f"{n_kept}E-pruned", options=opts)
        if to == "gguf":
            written = _to_gguf(model, PrunedSource(source, kept, stamp), config, out, outtype, opts, force, progress,
                               quant)
            return PruneResult(out, kept, t.experts, n_kept, written, stamp.name, criterion)
        written = write_checkpoint(out, src_dir, _plan(source, kept), config, stamp, force=force, label="pruning",
                                   progress=progress, shards=shards, max_shard_bytes=max_shard_bytes)
    finally:
        source.close()
    return PruneResult(out, kept, t.experts, n_kept, written, stamp.name, criterion)


def _plan(source: Any, kept: dict[int, list[int]]) -> list[Planned]:
    """Every output tensor in the input's order: MoE tensors cut to the kept experts, the rest copied."""
    plan: list[Planned] = []
    for info in source.infos().values():
        m = _MOE.search(info.name)
        if m is None:
            plan.append((info.name, info.shape, info.dtype, copy_tensor(source, info)))
            continue
        ids = kept[int(m[1])]
        plan.append((info.name, (len(ids), *info.shape[1:]), info.dtype, _sliced(source, info.name, ids,
                                                                                  m[2] == "router.weight")))
    return plan


def prune_shard_count(src: ModelLike, *, keep: KeepSpec | None = None, drop: KeepSpec | None = None,
                      max_shard_bytes: int | None = None) -> int:
    """How many safetensors files `prune_experts` writes with these arguments, from the input's headers alone:
    what a caller writing each shard in its own process (`shards=(i,)`) needs first."""
    from toolbox.reference import resolve

    model = resolve(src)
    t = model.checkpoint.text
    kept = resolve_keep(keep=keep, drop=drop, experts=t.experts, top_k=t.top_k, moe_layers=t.moe_layers)
    source = model.open_source()
    try:
        return plan_shard_count(_plan(source, kept), max_shard_bytes)
    finally:
        source.close()


def _to_gguf(model: Any, pruned: PrunedSource, config: dict[str, Any], out: Path, outtype: str,
             opts: LicenseOptions, force: bool, progress: Progress, quant: dict[str, Any]) -> int:
    """The pruned model streamed into the GGUF converter (named and declared as the HF output would be)."""
    from toolbox.merge.chain import derived_to_gguf

    cfg = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)  # as write_checkpoint: FP8 sources are dequantized on read
    gguf_opts = LicenseOptions(name=pruned.stamp.name, mau_declaration=opts.mau_declaration,
                               base_model=opts.base_model)
    res = derived_to_gguf(model, cfg, lambda: pruned, out, tag="prune-", license_options=gguf_opts, force=force,
                          progress=progress, outtype=outtype, **quant)
    return res.bytes


def _sliced(source: Any, name: str, ids: list[int], whole: bool) -> Any:
    def emit(writer: Any) -> None:
        if whole:  # the router is [E, H]: small, read at once
            writer.write(name, source.load(name)[ids].contiguous())
        else:
            from toolbox.tensors.source import raw_file_source

            raw = raw_file_source(source, name)
            for e in ids:  # each kept expert is one contiguous row of the stored tensor: copied in the kernel
                if raw is not None:
                    writer.copy_range(name, *raw.byte_range(name, e))
                else:
                    writer.write(name, source.load_slice(name, e))
    return emit


def choose_keep(count: int, criterion: str, *, moe_layers: tuple[int, ...], experts: int,
                stats: Any = None, seed: int = 0) -> dict[int, list[int]]:
    """{layer: kept} by a criterion: the `count` best by frequency/reap/ean, or a seeded random set."""
    import random

    from toolbox.errors import UsageError
    from toolbox.experts.stats import CRITERIA

    if criterion == "random":
        rng = random.Random(seed)
        return {layer: sorted(rng.sample(range(experts), count)) for layer in moe_layers}
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}", hint=f"choose {', '.join(CRITERIA)} or random")
    if not 0 < count <= experts:
        raise UsageError(f"--keep-count {count} is not between 1 and {experts}")
    if stats is None or set(stats.layers) != set(moe_layers) or stats.experts != experts:
        raise UsageError("the statistics do not describe this model's MoE layers and experts")
    return stats.keep_top(count, criterion)


def prune_by_criterion(src: ModelLike, out: str | Path, *, count: int, criterion: str,
                       calibration: str | Path | None = None, stats: Any = None, seed: int = 0,
                       max_tokens: int = 2048, seq_len: int = 512, dtype: str = "float32",
                       progress: Progress = NULL_PROGRESS, **kwargs: Any) -> PruneResult:
    """Keep `count` experts per MoE layer chosen by `criterion` from statistics (given, or measured
    on `calibration` now, as `router_stats` with `seq_len` and `dtype`), then `prune_experts`."""
    from toolbox.experts.output import require_hf
    from toolbox.experts.stats import router_stats
    from toolbox.merge.chain import check_quant, take_quant
    from toolbox.reference import resolve

    require_hf(src)
    check_quant(kwargs.get("to", "hf"), kwargs.get("outtype", "auto"), take_quant(dict(kwargs)))  # before the stats
    model = resolve(src)
    t = model.checkpoint.text
    if criterion != "random" and stats is None:
        stats = router_stats(model.path, calibration, max_tokens=max_tokens, seq_len=seq_len, dtype=dtype,
                             progress=progress)
    keep = choose_keep(count, criterion, moe_layers=t.moe_layers, experts=t.experts, stats=stats, seed=seed)
    extra: dict[str, Any] = {"seed": seed} if criterion == "random" else {"calibration_tokens": stats.tokens}
    if criterion != "random" and calibration is not None:
        extra["calibration"] = Path(calibration).name
    result = prune_experts(model, out, keep=keep, criterion=criterion, extra_provenance=extra, progress=progress,
                           **kwargs)
    if stats is not None and criterion != "random":
        result.scores = {k: [e.score(criterion) for e in v] for k, v in stats.layers.items()}
    return result
