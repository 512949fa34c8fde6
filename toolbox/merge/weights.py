"""Weight merges of full fine-tunes (linear, task arithmetic, TIES, DARE, SLERP, model stock), streamed.

Every input is read through the canonical expert view (fused, per-expert and FP8 layouts alike) one
piece at a time: an expert slice of a fused expert tensor, a row block of any other 2-D tensor, or a
small tensor whole. Each piece of every input is widened to float32 in row blocks and merged by
`toolbox.merge.methods`; methods that need whole-tensor statistics (TIES's top-k threshold, DARE's
rescale, SLERP's and model stock's norms and cosines) read the tensor's pieces once more per
statistics pass first. Memory is bounded by one expert slice per input (two while the next is read
ahead), whatever the model size. The output is stamped `base_model_relation: merge` with every
input's file hashes in the provenance.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions, derive_stamp
from toolbox.errors import BadInputError, UsageError
from toolbox.hf_output import finish_hf_directory
from toolbox.merge.methods import SPECS, MergeParams, TensorMerge
from toolbox.merge_choices import METHODS
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike
from toolbox.tensors.dtypes import HF_OUT_DTYPES

if TYPE_CHECKING:
    import torch

    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorInfo, TensorSource

ROW_BLOCK_BYTES = 16 * 1024**2  # float32 bytes of one row block of one input being merged
FLOAT_ST = ("BF16", "F16", "F32")
HASH_CHUNK = 16 * 1024**2


@dataclass
class WeightMergeResult:
    path: Path
    method: str
    tensors: int
    dtype: str
    inputs: list[dict[str, Any]]
    passes: dict[str, int] = field(default_factory=dict)  # tensors by number of reads of every input
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "method": self.method, "tensors": self.tensors,
                "dtype": self.dtype, "inputs": self.inputs, "passes": self.passes}


def _floats(values: list[float] | None, n: int, what: str, default: float) -> tuple[float, ...]:
    """One value per model: none (the default), one for all, or one each."""
    if not values:
        return (default,) * n
    if len(values) == 1:
        values = list(values) * n
    if len(values) != n:
        raise UsageError(f"{len(values)} {what} values for {n} models",
                         hint=f"give --{what} once for all models, or once per model in order")
    if any(not math.isfinite(float(v)) for v in values):
        raise UsageError(f"--{what} values must be finite numbers")
    return tuple(float(v) for v in values)


def resolve_params(method: str, n_models: int, *, weights: list[float] | None = None,
                   densities: list[float] | None = None, normalize: bool | None = None,
                   rescale: bool | None = None, t: float | None = None, seed: int = 0) -> MergeParams:
    """The parameters checked against the method (UsageError, exit 2), defaults as mergekit's."""
    if method not in SPECS:
        raise UsageError(f"unknown merge method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    spec = SPECS[method]
    if n_models < spec.min_models or (spec.max_models is not None and n_models > spec.max_models):
        need = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}")
        raise UsageError(f"{method} merges {need} model(s) besides the base; got {n_models}",
                         hint="pass BASE first, then the fine-tuned models")
    dens = _floats(densities, n_models, "density", 1.0)
    if densities and spec.sparsify is None:
        raise UsageError(f"{method} takes no --density", hint="density applies to ties, dare_ties and dare_linear")
    if any(not 0.0 <= d <= 1.0 for d in dens):
        raise UsageError("--density must lie in [0, 1]")
    if t is not None and method != "slerp":
        raise UsageError(f"{method} takes no t", hint="t is SLERP's interpolation factor")
    if t is not None and not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise UsageError("t must lie in [0, 1]")
    if weights and method in ("slerp", "model_stock"):
        raise UsageError(f"{method} takes no --weight", hint="slerp takes t; model stock derives its own weights")
    if not 0 <= seed < 1 << 63:
        raise UsageError("--seed must lie in [0, 2**63)")
    return MergeParams(method, _floats(weights, n_models, "weight", 1.0), dens,
                       spec.normalize if normalize is None else bool(normalize),
                       spec.rescale if rescale is None else bool(rescale), 0.5 if t is None else float(t), seed)


def _check_same_shape(base: ResolvedModel, base_src: TensorSource, models: list[ResolvedModel],
                      sources: list[TensorSource]) -> None:
    """Scout with Scout, Maverick with Maverick: the family and every tensor's name and shape must agree."""
    ref = base.checkpoint.family
    infos = base_src.infos()
    for m, src in zip(models, sources, strict=True):
        fam = m.checkpoint.family
        if fam != ref:
            raise BadInputError(f"{m.path}: a {fam.removesuffix('-like')} checkpoint cannot be merged with the "
                                f"{ref.removesuffix('-like')} base {base.label}", path=m.path,
                                hint="weight merges need fine-tunes of the same model (Scout with Scout, "
                                "Maverick with Maverick)")
        other = src.infos()
        for name, info in infos.items():
            o = other.get(name)
            if o is None or o.shape != info.shape:
                got = "missing" if o is None else f"shape {list(o.shape)}"
                raise BadInputError(f"{m.path}: tensor {name} is {got}, the base has {list(info.shape)}",
                                    path=m.path, hint="merge fine-tunes of the same base checkpoint")
        extra = sorted(set(other) - set(infos))
        if extra:
            raise BadInputError(f"{m.path}: tensor {extra[0]} is not in the base ({len(extra)} extra)",
                                path=m.path, hint="merge fine-tunes of the same base checkpoint")


def input_hashes(model: ResolvedModel) -> dict[str, str]:
    """sha256 of a checkpoint's weight and config files: a download manifest's (checked when fetched), else
    computed here, one bounded chunk at a time."""
    from toolbox.hub.manifest import source_origin

    recorded = source_origin(model.directory).get("sources") or {}
    if recorded:
        return dict(recorded)
    files = sorted(p for p in model.directory.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"))
    out = {}
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        out[path.name] = f"sha256:{h.hexdigest()}"
    return out


def _units(info: TensorInfo) -> list[tuple[int | slice, int]]:
    """(dim-0 index to load, flat offset) of each piece of a tensor, in flat order."""
    shape = info.shape
    if len(shape) == 3:
        per = shape[1] * shape[2]
        return [(e, e * per) for e in range(shape[0])]
    if len(shape) == 2:
        step = max(1, ROW_BLOCK_BYTES // max(4 * shape[1], 1))
        return [(slice(r, min(r + step, shape[0])), r * shape[1]) for r in range(0, shape[0], step)]
    return [(slice(None), 0)]


def _blocks(pieces: list[torch.Tensor], offset: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(row start, flat offset, float32 blocks of every input) of loaded pieces, in row blocks."""
    first = pieces[0]
    if first.dim() < 2:
        yield 0, offset, [p.float() for p in pieces]
        return
    cols = first.shape[-1]
    step = max(1, ROW_BLOCK_BYTES // max(4 * cols, 1))
    for r in range(0, first.shape[0], step):
        yield r, offset + r * cols, [p[r:r + step].float() for p in pieces]


def _stream(sources: list[TensorSource], info: TensorInfo,
            each: Callable[[int | slice, int, list[torch.Tensor]], None]) -> None:
    """Call `each` on every piece of every input, the next piece read by a thread while this one is used."""
    units = _units(info)

    def load(index: int | slice) -> list[torch.Tensor]:
        if info.shape and len(info.shape) >= 2:
            return [s.load_slice(info.name, index) for s in sources]
        return [s.load(info.name) for s in sources]

    with ThreadPoolExecutor(1, thread_name_prefix="corral-read") as reader:
        ahead = reader.submit(load, units[0][0])
        for i, (index, offset) in enumerate(units):
            pieces = ahead.result()
            if i + 1 < len(units):
                ahead = reader.submit(load, units[i + 1][0])
            each(index, offset, pieces)
            del pieces


def _merge_tensor(sources: list[TensorSource], writer: Any, info: TensorInfo, out_dt: torch.dtype,
                  params: MergeParams) -> int:
    """Write one merged tensor; returns how many times each input's tensor was read."""
    import torch

    tm = TensorMerge(info.name, info.numel, params)
    for k in range(tm.passes):
        _stream(sources, info, lambda _i, off, pieces, k=k: [
            tm.observe(k, o, bs[0], bs[1:]) for _r, o, bs in _blocks(pieces, off)])
        tm.end_pass(k)

    def merge_piece(_index: int | slice, offset: int, pieces: list[torch.Tensor]) -> None:
        out = torch.empty(pieces[0].shape, dtype=out_dt)
        for r, off, bs in _blocks(pieces, offset):
            merged = tm.merge(off, bs[0], bs[1:])
            if out.dim() < 2:
                out.copy_(merged)
            else:
                out[r:r + merged.shape[0]] = merged
        writer.write(info.name, out.reshape(info.shape) if not info.shape else out)

    _stream(sources, info, merge_piece)
    return tm.passes + 1


def _out_config(config: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    from toolbox.merge.merge import _output_config

    return _output_config(config, dtype)


def merge_weights(base: ModelLike, models: list[ModelLike], out: str | Path, *, method: str,
                  weights: list[float] | None = None, densities: list[float] | None = None,
                  normalize: bool | None = None, rescale: bool | None = None, t: float | None = None,
                  seed: int = 0, dtype: str | None = None, force: bool = False,
                  license_options: LicenseOptions | None = None, progress: Progress = NULL_PROGRESS,
                  extra_op: dict[str, Any] | None = None) -> WeightMergeResult:
    """Merge full fine-tunes of `base` by a mergekit method into an HF checkpoint, streamed and stamped.

    `method` is one of METHODS; for `linear` the models are averaged (weighted) and the base only supplies
    the config and tokenizer (list it among `models` to average it too). `weights`/`densities`: one value
    for all models or one each; `normalize`/`rescale` default as in mergekit; `t` is SLERP's factor
    (0: the base); `seed` makes DARE's masks (per tensor, input and block). `dtype` auto/bf16/f16/f32
    (auto: the base's); the math is float32 throughout. The output appears only once complete.
    """
    from toolbox.reference import resolve
    from toolbox.tensors.atomic import atomic_directory, check_output_path, ensure_free_space
    from toolbox.tensors.sink import SafetensorsWriter
    from toolbox.tensors.source import TensorInfo

    opts = LicenseOptions.of(license_options)
    params = resolve_params(method, len(models), weights=weights, densities=densities, normalize=normalize,
                            rescale=rescale, t=t, seed=seed)
    key = (dtype or "auto").lower()
    if key not in HF_OUT_DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}", hint="choose auto, bf16, f16 or f32")
    requested = HF_OUT_DTYPES[key]
    out = Path(out).absolute()
    check_output_path(out, force=force)
    base_model = resolve(base)
    resolved = [resolve(m) for m in models]
    for m in [base_model, *resolved]:
        if not m.path.exists():
            raise BadInputError(f"{m.path}: no such checkpoint", path=m.path, hint="check the path")
    base_src = base_model.open_source()
    sources = [base_src]
    try:
        sources += [m.open_source() for m in resolved]
        _check_same_shape(base_model, base_src, resolved, sources[1:])
        infos = base_src.infos()
        out_st = {n: (requested or i.dtype) if i.dtype in FLOAT_ST else i.dtype for n, i in infos.items()}
        stamp, described = _stamp(base_model, base_src, resolved, params, key, opts, extra_op)
        result = WeightMergeResult(out, method, len(infos), requested or "auto", described, name=stamp.name)
        ensure_free_space(out, sum(TensorInfo(n, i.shape, out_st[n]).nbytes for n, i in infos.items()),
                          f"the merged checkpoint {out.name}")
        with atomic_directory(out, force=force) as staging:
            writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata())
            for name, info in infos.items():
                writer.add(name, info.shape, out_st[name])
            writer.begin()
            with progress.task("merging", total=sum(i.nbytes for i in infos.values()), unit="bytes") as task:
                for name, info in infos.items():
                    reads = _write_tensor(sources, writer, info, out_st[name], params)
                    result.passes[str(reads)] = result.passes.get(str(reads), 0) + 1
                    task.advance(info.nbytes)
            writer.finish()
            finish_hf_directory(staging, base_model.directory, _out_config(base_model.checkpoint.config, requested),
                                stamp)
    finally:
        for s in sources:
            s.close()
    return result


def _write_tensor(sources: list[TensorSource], writer: Any, info: TensorInfo, out_st: str,
                  params: MergeParams) -> int:
    """A float tensor merged; anything else (none in Llama 4 today) copied from the base."""
    import torch

    from toolbox.tensors.dtypes import TORCH_NAME

    if info.dtype not in FLOAT_ST:
        writer.write(info.name, sources[0].load(info.name))
        return 1
    return _merge_tensor(sources, writer, info, getattr(torch, TORCH_NAME[out_st]), params)


def _stamp(base: ResolvedModel, base_src: TensorSource, models: list[ResolvedModel], params: MergeParams,
           dtype: str, opts: LicenseOptions, extra_op: dict[str, Any] | None) -> tuple[Any, list[dict[str, Any]]]:
    """relation merge; the base's and every model's file hashes in the provenance, the parameters in the op."""
    sources: dict[str, str] = {}
    described = []
    labels: set[str] = set()
    for i, m in enumerate([base, *models]):
        label = m.label if m.label not in labels else f"{m.label}#{i}"
        labels.add(label)
        hashes = input_hashes(m)
        sources.update({f"{label}/{k}": v for k, v in hashes.items()})
        entry: dict[str, Any] = {"name": label, "role": "base" if i == 0 else "model",
                                 "sha256": {k: v.removeprefix("sha256:") for k, v in hashes.items()}}
        if i:
            entry["weight"] = params.weights[i - 1]
            if SPECS[params.method].sparsify:
                entry["density"] = params.densities[i - 1]
        described.append(entry)
    op: dict[str, Any] = {"op": "merge", "method": params.method, "dtype": dtype, "normalize": params.normalize,
                          "inputs": [{k: v for k, v in d.items() if k != "sha256"} for d in described],
                          **({"t": params.t} if params.method == "slerp" else {}),
                          **({"seed": params.seed, "rescale": params.rescale}
                             if SPECS[params.method].sparsify == "random" else {}),
                          **(extra_op or {})}
    stamp = derive_stamp(base.stamp_input(base_src), op, opts, suffix="merged", multimodal=base.checkpoint.multimodal,
                         relation="merge", sources=sources)
    return stamp, described
