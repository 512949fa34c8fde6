"""LoRA extraction: a full fine-tune of a Llama 4 checkpoint turned back into a PEFT LoRA adapter.

The difference FINETUNE - BASE of every targeted tensor is factored by truncated SVD
(`toolbox.merge.lowrank`): attention, shared expert and dense MLP weights become ordinary LoRA
modules; routed experts become PEFT `target_parameters` factors in today's layout (peft >= 0.19.1,
read by `toolbox.merge.plan`): for a parameter stored [E, d1, d2], A [r*E, d2] grouped by expert and
B [d1, r*E] interleaved by rank, delta[e] = B[:, e::E] @ A[e*r:(e+1)*r]. With both expert parameters
of a block targeted PEFT nests its wrappers in definition order, so gate_up_proj's factors sit under
`experts.base_layer.` and down_proj's under `experts.`.

Streamed: one 2-D tensor, or one expert slice of both inputs, is in memory at a time (plus one
fused tensor's B factor, r*E columns wide). The adapter is stamped like every corral output
(relation `adapter`, both inputs' file hashes in the provenance) and published atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions, derive_stamp
from toolbox.errors import BadInputError, UsageError
from toolbox.merge.adapter import CONFIG_NAME, KEY_PREFIX
from toolbox.merge.config import MAX_PATTERNS, MAX_RANK, pattern_key, validate_config
from toolbox.merge.lowrank import Energy, SvdMethod, factorize, slice_seed
from toolbox.merge.plan import EXPERT_PARAMS
from toolbox.merge_choices import FACTOR_DTYPES, SVD_METHODS, TARGET_GROUPS
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike

if TYPE_CHECKING:
    import torch

    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorInfo, TensorSource

GROUPS = TARGET_GROUPS
_GROUP_RE: dict[str, re.Pattern[str]] = {
    "attention": re.compile(r"(?:^|\.)layers\.\d{1,6}\.self_attn\.[qkvo]_proj\.weight$"),
    "shared_expert": re.compile(r"(?:^|\.)layers\.\d{1,6}\.feed_forward\.shared_expert\.(?:gate|up|down)_proj"
                                r"\.weight$"),
    "dense_mlp": re.compile(r"(?:^|\.)layers\.\d{1,6}\.feed_forward\.(?:gate|up|down)_proj\.weight$"),
    "experts": re.compile(r"(?:^|\.)layers\.\d{1,6}\.feed_forward\.experts\.(?:gate_up_proj|down_proj)$"),
}
OUT_DTYPES = FACTOR_DTYPES
# the layout written for routed experts is the one peft uses since 0.19.1; the version recorded is one that
# reads it (the merge's layout detection and peft's loader both key on it)
PEFT_VERSION = "0.21.2"
HASH_BLOCK = 8 << 20
COMPARE_BLOCK_BYTES = 64 << 20
MAX_LISTED = 20  # names of differing untargeted tensors kept in the report


@dataclass
class Target:
    """One base tensor turned into one pair of LoRA factors."""

    tensor: str
    group: str
    module: str  # the PEFT module the keys name (with `.base_layer` for the inner expert wrapper)
    pattern_name: str  # what rank_pattern matches: the module, or `experts.<param>` for target_parameters
    rank: int
    scale: float
    shape: tuple[int, ...]

    @property
    def a_key(self) -> str:
        return f"{KEY_PREFIX}{self.module}.lora_A.weight"

    @property
    def b_key(self) -> str:
        return f"{KEY_PREFIX}{self.module}.lora_B.weight"

    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) shapes: [r, in] / [out, r] for a linear weight [out, in]; [r*E, d2] / [d1, r*E] for experts."""
        if len(self.shape) == 3:
            n, d1, d2 = self.shape
            return (self.rank * n, d2), (d1, self.rank * n)
        out_f, in_f = self.shape
        return (self.rank, in_f), (out_f, self.rank)


@dataclass
class TensorEnergy:
    name: str
    group: str
    rank: int
    delta_norm: float
    retained_energy: float
    relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "rank": self.rank, "delta_norm": self.delta_norm,
                "retained_energy": self.retained_energy, "relative_error": self.relative_error}


@dataclass
class ExtractResult:
    path: Path
    name: str
    rank: int
    alpha: float
    dtype: str
    svd: str
    tensors: list[TensorEnergy] = field(default_factory=list)
    untargeted_changed: list[str] = field(default_factory=list)  # differing tensors the adapter cannot carry
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    total: Energy = field(default_factory=Energy)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "rank": self.rank, "alpha": self.alpha,
                "dtype": self.dtype, "svd": self.svd, "retained_energy": self.total.retained,
                "relative_error": self.total.relative_error, "tensors": [t.to_dict() for t in self.tensors],
                "untargeted_changed": self.untargeted_changed, "warnings": self.warnings, "inputs": self.inputs}


def parse_rank_pattern(items: Iterable[str] | dict[str, int] | None) -> dict[str, int]:
    """`REGEX=R` strings (or a dict) as a checked rank_pattern; UsageError (exit 2) for a malformed entry."""
    if items is None:
        return {}
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for text in items:
            key, sep, value = str(text).rpartition("=")
            if not sep or not key or not value.strip().isdigit():
                raise UsageError(f"--rank-pattern {text!r} is not REGEX=RANK", hint="e.g. --rank-pattern 'q_proj=16'")
            pairs.append((key, int(value)))
    if len(pairs) > MAX_PATTERNS:
        raise UsageError(f"{len(pairs)} rank patterns; at most {MAX_PATTERNS}")
    out: dict[str, int] = {}
    for key, value in pairs:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
            raise UsageError(f"rank pattern {key!r}: rank {value!r} is not an integer in 1..{MAX_RANK}")
        try:
            pattern_key({key: value}, "")  # compiles it with RE2, as the merge and validate_config will
        except ValueError as exc:
            raise UsageError(f"rank pattern {key!r}: {exc}", hint="patterns are matched by RE2: no backreferences "
                             "or look-around") from None
        out[key] = value
    return out


def extract_lora(finetune: ModelLike, base: ModelLike, out: str | Path, *, rank: int,
                 rank_pattern: Iterable[str] | dict[str, int] | None = None, targets: Iterable[str] | None = None,
                 alpha: float | None = None, dtype: str = "f32", svd: SvdMethod = "auto", force: bool = False,
                 license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                 **legacy: Any) -> ExtractResult:
    """Write a PEFT LoRA adapter approximating FINETUNE - BASE at rank `rank` (per target: `rank_pattern`,
    PEFT's `(.*\\.)?(KEY)$` rule through RE2). `alpha` defaults to each target's rank (scaling 1); `targets`
    are groups of GROUPS (default all); `dtype` f32/bf16/f16 of the factors; `svd` auto/full/randomized.

    Refused before anything is written: inputs of different shapes or variants (exit 3), a rank outside
    1..min(dims) of a targeted tensor or an existing output without `force` (exit 2)."""
    from toolbox.reference import resolve
    from toolbox.tensors.atomic import check_output_path, ensure_free_space

    opts = LicenseOptions.of(license_options, **legacy)
    groups, patterns, out_st = _check_options(rank, rank_pattern, targets, alpha, dtype, svd)
    out = Path(out).absolute()
    check_output_path(out, force=force)
    ft_model, base_model = resolve(finetune), resolve(base)
    _same_variant(ft_model, base_model)
    ft_src, base_src = ft_model.open_source(), base_model.open_source()
    try:
        infos = _same_tensors(ft_model, base_model, ft_src.infos(), base_src.infos())
        plan = plan_targets(infos, groups, rank, patterns, alpha)
        if not plan:
            raise BadInputError(f"{base_model.path}: no tensor of the groups {', '.join(groups)} in this checkpoint",
                                hint=f"choose --target among {', '.join(GROUPS)}", path=base_model.path)
        config = adapter_config(plan, rank, patterns, alpha, base_model, opts)
        validate_config(config, out / CONFIG_NAME)
        factor_bytes = sum(math.prod(s) * (4 if out_st == "F32" else 2) for t in plan for s in t.factor_shapes())
        ensure_free_space(out, factor_bytes, f"the adapter {out.name}")
        hashes = _input_hashes({"finetune": ft_model, "base": base_model}, progress)
        op = {"op": "extract-lora", "rank": rank, "alpha": alpha if alpha is not None else "rank",
              "rank_pattern": patterns, "targets": list(groups), "dtype": dtype, "svd": svd,
              "peft_version": PEFT_VERSION,
              "inputs": {role: {"label": m.label, "sha256": hashes[role]["digest"]}
                         for role, m in (("finetune", ft_model), ("base", base_model))}}
        sources = {f"{role}/{name}": digest for role in hashes for name, digest in hashes[role]["files"].items()}
        stamp = derive_stamp(ft_model.stamp_input(ft_src), op, opts, suffix=f"lora-r{rank}",
                             multimodal=base_model.checkpoint.multimodal, relation="adapter", sources=sources,
                             base_model=_base_repo(base_model, base_src))
        result = ExtractResult(out, stamp.name, rank, float(alpha if alpha is not None else rank), dtype, svd,
                               inputs={role: {"label": m.label, "sha256": hashes[role]["digest"]}
                                       for role, m in (("finetune", ft_model), ("base", base_model))})
        targeted = {t.tensor for t in plan}
        result.untargeted_changed = _differing(ft_src, base_src, [i for n, i in infos.items() if n not in targeted])
        if result.untargeted_changed:
            result.warnings.append(
                f"{len(result.untargeted_changed)} tensor(s) outside the targets differ between the inputs and are "
                f"not in the adapter (first: {result.untargeted_changed[0]})")
            del result.untargeted_changed[MAX_LISTED:]
        _write_adapter(out, force, plan, config, stamp, ft_src, base_src, out_st, svd, result, progress)
    finally:
        ft_src.close()
        base_src.close()
    return result


def _check_options(rank: int, rank_pattern: Any, targets: Iterable[str] | None, alpha: float | None, dtype: str,
                   svd: str) -> tuple[tuple[str, ...], dict[str, int], str]:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise UsageError(f"--rank {rank!r} must be an integer in 1..{MAX_RANK}")
    if alpha is not None and not (math.isfinite(alpha) and 0 < alpha <= 1e9):
        raise UsageError(f"--alpha {alpha!r} must be a positive finite number",
                         hint="leave it out for alpha = rank (scaling 1)")
    if dtype not in OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint=f"choose {', '.join(OUT_DTYPES)}")
    if svd not in SVD_METHODS:
        raise UsageError(f"unknown --svd {svd!r}", hint=f"choose {', '.join(SVD_METHODS)}")
    groups = tuple(dict.fromkeys(str(g).replace("-", "_") for g in (targets or GROUPS)))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise UsageError(f"unknown --target {bad[0]!r}", hint=f"choose among {', '.join(GROUPS)}")
    return groups, parse_rank_pattern(rank_pattern), OUT_DTYPES[dtype]


def _same_variant(ft: ResolvedModel, base: ResolvedModel) -> None:
    a, b = ft.checkpoint, base.checkpoint
    if a.family != b.family or a.multimodal != b.multimodal:
        raise BadInputError(f"{ft.path}: a {a.family} checkpoint{' (multimodal)' if a.multimodal else ''}, but the "
                            f"base {base.path} is {b.family}{' (multimodal)' if b.multimodal else ''}",
                            hint="extract from a fine-tune of this very base", path=ft.path)


def _same_tensors(ft: ResolvedModel, base: ResolvedModel, a: dict[str, TensorInfo],
                  b: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The base's inventory, once both checkpoints are shown to hold the same tensor names and shapes."""
    for name in b:
        if name not in a:
            raise BadInputError(f"{ft.path}: no tensor {name}, which the base holds",
                                hint="both inputs must be the same Llama 4 model (one a fine-tune of the other)",
                                path=ft.path)
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise BadInputError(f"{ft.path}: {name} is {list(a[name].shape)} but {list(b[name].shape)} in the base",
                                hint="both inputs must have the same shapes (same variant, expert count, vocabulary)",
                                path=ft.path)
    extra = next((n for n in a if n not in b), None)
    if extra is not None:
        raise BadInputError(f"{ft.path}: {extra} is not in the base {base.path}",
                            hint="both inputs must be the same Llama 4 model", path=ft.path)
    return b


def _group(name: str) -> str | None:
    if "vision_model." in name or "multi_modal_projector." in name:
        return None
    return next((g for g, rx in _GROUP_RE.items() if rx.search(name)), None)


def plan_targets(infos: dict[str, TensorInfo], groups: Iterable[str], rank: int, patterns: dict[str, int],
                 alpha: float | None) -> list[Target]:
    """Every targeted tensor with its PEFT module, rank and scale; UsageError when a rank does not fit."""
    chosen = set(groups)
    named = [(n, g) for n in infos if (g := _group(n)) is not None and g in chosen]
    fused = {n for n, g in named if g == "experts"}
    plan: list[Target] = []
    for name, group in named:
        shape = tuple(infos[name].shape)
        if group == "experts":
            root, _, param = name.rpartition(".")
            both = all(f"{root}.{p}" in fused for p in EXPERT_PARAMS)
            module = f"{root}.base_layer" if both and param == EXPERT_PARAMS[0] else root
            pattern_name = name
            dims = shape[1:]
        else:
            module = pattern_name = name.removesuffix(".weight")
            dims = shape
        key = pattern_key(patterns, pattern_name)
        r = patterns[key] if key else rank
        if r > min(dims):
            raise UsageError(f"rank {r} for {name} exceeds its smaller dimension {min(dims)} (shape {list(shape)})",
                             hint="lower --rank, or give this tensor a smaller rank with --rank-pattern")
        scale = (alpha / r) if alpha is not None else 1.0
        plan.append(Target(name, group, module, pattern_name, r, scale, shape))
    return plan


def adapter_config(plan: list[Target], rank: int, patterns: dict[str, int], alpha: float | None,
                   base: ResolvedModel, opts: LicenseOptions) -> dict[str, Any]:
    """adapter_config.json: every target named in full (nothing else gets wrapped when PEFT loads it)."""
    modules = [t.module for t in plan if len(t.shape) == 2]
    params = [t.tensor for t in plan if len(t.shape) == 3]
    return {
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": opts.base_model or base.label,
        "r": rank, "lora_alpha": float(alpha) if alpha is not None else rank,
        # alpha = rank per pattern too, so that every target's scaling is 1
        "rank_pattern": dict(patterns), "alpha_pattern": {} if alpha is not None else dict(patterns),
        "target_modules": modules or None, "target_parameters": params or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def _base_repo(model: ResolvedModel, source: TensorSource) -> str | None:
    """The base's Hub repo id for the card (from its download manifest or its own stamp), when known."""
    inp = model.stamp_input(source)
    repo = inp.origin.get("base_model")
    if repo:
        return str(repo)
    from license.keys import BASE_MODEL

    return inp.prior.get(BASE_MODEL)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _input_hashes(models: dict[str, ResolvedModel], progress: Progress) -> dict[str, dict[str, Any]]:
    """Per input: the sha256 of config.json, the index and every shard (from a download manifest when it has
    them, else read here, the two inputs in parallel), and one digest over that list."""
    from toolbox.hub.manifest import source_origin

    jobs: dict[str, dict[str, Path]] = {}
    known: dict[str, dict[str, str]] = {}
    for role, m in models.items():
        d = m.directory
        known[role] = dict(source_origin(d).get("sources") or {})
        files = sorted({*d.glob("*.safetensors"), *d.glob("*.safetensors.index.json"), d / "config.json"})
        jobs[role] = {f.name: f for f in files if f.is_file() and f.name not in known[role]}
    total = sum(f.stat().st_size for j in jobs.values() for f in j.values())
    out: dict[str, dict[str, Any]] = {}
    with progress.task("hashing inputs", total=total, unit="bytes") as task, ThreadPoolExecutor(2) as pool:
        futures = {role: {n: pool.submit(_sha256, f) for n, f in j.items()} for role, j in jobs.items()}
        for role, fs in futures.items():
            files = dict(known[role])
            for n, fut in fs.items():
                files[n] = f"sha256:{fut.result()}"
                task.advance(jobs[role][n].stat().st_size)
            listing = "".join(f"{n}\t{v}\n" for n, v in sorted(files.items()))
            out[role] = {"files": files, "digest": hashlib.sha256(listing.encode()).hexdigest()}
    return out


def _differing(a: TensorSource, b: TensorSource, infos: list[TensorInfo]) -> list[str]:
    """Names of the untargeted tensors whose values differ (compared in row blocks or expert slices)."""
    import torch

    out = []
    for info in infos:
        if len(info.shape) < 2:
            same = torch.equal(a.load(info.name), b.load(info.name))
        elif len(info.shape) == 3:
            same = all(torch.equal(a.load_slice(info.name, e), b.load_slice(info.name, e))
                       for e in range(info.shape[0]))
        else:
            step = max(1, COMPARE_BLOCK_BYTES // max(4 * math.prod(info.shape[1:]), 1))
            same = all(torch.equal(a.load_slice(info.name, slice(r, r + step)), b.load_slice(info.name,
                                                                                               slice(r, r + step)))
                       for r in range(0, info.shape[0], step))
        if not same:
            out.append(info.name)
    return out


def _diff(ft: torch.Tensor, base: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    d = ft.float().sub_(base.float())
    if not bool(torch.isfinite(d).all()):
        raise BadInputError(f"{name}: the difference of the inputs holds NaN/Inf",
                            hint="one of the checkpoints is corrupt (check it with corral verify --deep); "
                            "nothing was written")
    return d


def _write_adapter(out: Path, force: bool, plan: list[Target], config: dict[str, Any], stamp: Any,
                   ft: TensorSource, base: TensorSource, out_st: str, svd: str, result: ExtractResult,
                   progress: Progress) -> None:
    """Factor every target in turn and write adapter_model.safetensors, the config and the stamp's sidecars."""
    import torch

    from license.stamp import write_sidecars
    from toolbox.tensors.atomic import atomic_directory
    from toolbox.tensors.sink import SafetensorsWriter

    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[out_st]
    with atomic_directory(out, force=force) as staging:
        writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata(), prefix="adapter_model",
                                   max_shard_bytes=1 << 62)  # PEFT reads one adapter_model.safetensors
        for t in plan:
            a_shape, b_shape = t.factor_shapes()
            writer.add(t.a_key, a_shape, out_st)
            writer.add(t.b_key, b_shape, out_st)
        writer.begin()
        with progress.task("extracting", total=sum(math.prod(t.shape) for t in plan), unit="items") as task:
            for t in plan:
                energy = Energy()
                if len(t.shape) == 3:
                    n, d1, _ = t.shape
                    b_all = torch.empty((d1, t.rank, n), dtype=dt)  # B [d1, r*E] interleaved: column k*E + e
                    for e in range(n):
                        d = _diff(ft.load_slice(t.tensor, e), base.load_slice(t.tensor, e), t.tensor)
                        b, a, part = factorize(d, t.rank, t.scale, dt, svd, slice_seed(t.tensor, e))  # type: ignore[arg-type]
                        del d
                        writer.write(t.a_key, a)  # A [r*E, d2]: expert e's rows are e*r..(e+1)*r, in order
                        b_all[:, :, e] = b
                        energy.add(part)
                        task.advance(math.prod(t.shape[1:]))
                    writer.write(t.b_key, b_all.reshape(d1, t.rank * n))
                    del b_all
                else:
                    d = _diff(ft.load(t.tensor), base.load(t.tensor), t.tensor)
                    b, a, energy = factorize(d, t.rank, t.scale, dt, svd, slice_seed(t.tensor, 0))  # type: ignore[arg-type]
                    del d
                    writer.write(t.a_key, a)
                    writer.write(t.b_key, b)
                    task.advance(math.prod(t.shape))
                result.total.add(energy)
                result.tensors.append(TensorEnergy(t.tensor, t.group, t.rank, math.sqrt(energy.total),
                                                   energy.retained, energy.relative_error))
        writer.finish()
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_sidecars(staging, stamp)
