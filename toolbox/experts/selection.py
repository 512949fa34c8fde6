"""Which experts to keep: parsing --keep/--drop lists and checking them against the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from toolbox.config_model import MAX_EXPERTS, MAX_LAYERS
from toolbox.errors import UsageError

KeepSpec = Sequence[int] | Mapping[int, Sequence[int]]
MAX_SPEC_CHARS = 100_000  # a list naming every expert of every layer of the largest config fits


def _number(text: str, what: str, bound: int) -> int:
    """A plain decimal below `bound` (no sign, no unicode digits, no 5000-digit strings)."""
    if not (text.isascii() and text.isdecimal()):
        raise UsageError(f"{text[:40]!r} is not {what}", hint="write e.g. 0,2,5-7")
    if len(text) > 9 or int(text) >= bound:
        raise UsageError(f"{what} {text[:40]} does not exist (a Llama 4 config has at most {bound})",
                         hint="numbers count from 0 (experts: up to num_local_experts - 1)")
    return int(text)


def parse_ids(text: str, *, experts: int = MAX_EXPERTS) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; every number below `experts` (so a range never expands past it)."""
    if len(text) > MAX_SPEC_CHARS:
        raise UsageError(f"an expert list of {len(text)} characters is too long", hint="write ranges, e.g. 0-7")
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        if dash:
            a, b = _number(lo, "an expert number", experts), _number(hi, "an expert number", experts)
            if b < a:
                raise UsageError(f"{part!r} is not an expert range (it ends before it starts)",
                                 hint="write e.g. 0,2,5-7")
            out.extend(range(a, b + 1))
        else:
            out.append(_number(part, "an expert number", experts))
        if len(out) > MAX_SPEC_CHARS:
            raise UsageError("the expert list names too many experts", hint="name each expert at most once")
    return out


def parse_spec(text: str) -> list[int] | dict[int, list[int]]:
    """One list for every MoE layer ('0-7') or one per layer ('1:0-7;3:2,4,9')."""
    if len(text) > MAX_SPEC_CHARS:
        raise UsageError(f"an expert list of {len(text)} characters is too long", hint="write ranges, e.g. 0-7")
    if ":" not in text:
        return parse_ids(text)
    per: dict[int, list[int]] = {}
    for chunk in text.split(";"):
        if not chunk.strip():
            continue
        layer, sep, ids = chunk.partition(":")
        if not sep:
            raise UsageError(f"{chunk[:60]!r} is not LAYER:EXPERTS", hint="write e.g. 1:0-7;3:2,4,9")
        per[_number(layer.strip(), "a layer number", MAX_LAYERS)] = parse_ids(ids)
    return per


def per_layer(spec: KeepSpec, moe_layers: Sequence[int]) -> dict[int, list[int]]:
    """A list for one layer or all layers -> {layer: list} covering exactly the MoE layers."""
    if isinstance(spec, Mapping):
        got = {int(k): [int(e) for e in v] for k, v in spec.items()}
        extra = sorted(set(got) - set(moe_layers))
        missing = sorted(set(moe_layers) - set(got))
        if extra or missing:
            raise UsageError(f"per-layer list names layers {sorted(got)}, the MoE layers are {list(moe_layers)}",
                             hint="give every MoE layer exactly once (or one list for all layers)")
        return got
    ids = [int(e) for e in spec]
    return {layer: list(ids) for layer in moe_layers}


def resolve_keep(*, keep: KeepSpec | None, drop: KeepSpec | None, experts: int, top_k: int,
                 moe_layers: Sequence[int]) -> dict[int, list[int]]:
    """{MoE layer: sorted kept experts}: same count in every layer, valid ids, at least top_k kept."""
    if (keep is None) == (drop is None):
        raise UsageError("give exactly one of keep or drop")
    if not moe_layers:
        raise UsageError("this model has no MoE layer: nothing to prune")
    chosen = per_layer(keep if keep is not None else drop, moe_layers)  # type: ignore[arg-type]
    result: dict[int, list[int]] = {}
    for layer, ids in chosen.items():
        bad = sorted({e for e in ids if not 0 <= e < experts})
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise UsageError(f"layer {layer}: expert(s) {shown} do not exist (the model has {experts}: "
                             f"0-{experts - 1})")
        if len(set(ids)) != len(ids):
            raise UsageError(f"layer {layer}: an expert is named twice in {ids}")
        kept = sorted(ids) if keep is not None else sorted(set(range(experts)) - set(ids))
        result[layer] = kept
    counts = {len(v) for v in result.values()}
    if len(counts) != 1:
        raise UsageError(f"different numbers of experts kept per layer ({sorted(counts)})",
                         hint="Llama 4 has one num_local_experts: keep the same number in every MoE layer")
    n = counts.pop()
    if n < max(top_k, 1):
        raise UsageError(f"keeping {n} expert(s) is below num_experts_per_tok={top_k}",
                         hint=f"keep at least {top_k} experts per layer (routing picks {top_k} per token)")
    return result
