"""Weight merges of full fine-tunes (linear, task arithmetic, TIES, DARE, SLERP, model stock), streamed.

Every input is read through the canonical expert view (fused, per-expert and FP8 layouts alike) one
piece at a time: an expert slice of a fused expert tensor, a row block of any other 2-D tensor, or a
small tensor whole. Each piece is split among WORKERS threads (at chunk boundaries), each widening
chunks of every input to float32 in its own buffers and merging them by `toolbox.merge.methods`;
methods that need whole-tensor statistics (TIES's top-k threshold, DARE's rescale, SLERP's and model
stock's norms and cosines) read the tensor's pieces once more per statistics pass first. Memory is
bounded by one expert slice per input (two while the next is read ahead), whatever the model size.
The output is stamped `base_model_relation: merge` with every input's file hashes in the provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions, derive_stamp
from toolbox.errors import BadInputError, UsageError
from toolbox.hf_output import finish_hf_directory
from toolbox.merge.methods import SPECS, MergeParams, TensorMerge, Workspace, spans
from toolbox.merge_choices import METHODS
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike
from toolbox.tensors.dtypes import HF_OUT_DTYPES

if TYPE_CHECKING:
    import torch

    from toolbox.merge.params import TensorParams
    from toolbox.reference import ResolvedModel
    from toolbox.tensors.source import TensorInfo, TensorSource

ROW_BLOCK_BYTES = 16 * 1024**2  # float32 bytes of one row block (a piece) of one input being merged
WORKERS = max(1, min(4, os.cpu_count() or 1))  # merge threads; each piece is split among them
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
    computed here, one bounded chunk at a time, the files in WORKERS threads at once (hashlib and file reads
    release the GIL)."""
    from toolbox.hub.manifest import source_origin

    recorded = source_origin(model.directory).get("sources") or {}
    if recorded:
        return dict(recorded)
    return _dir_hashes(model.directory, "config.json")


def _dir_hashes(directory: Path, config: str) -> dict[str, str]:
    """sha256 of a directory's .safetensors files and its config file(s) (a name, or a suffix)."""
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name == config or p.suffix == config))
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="corral-hash") as pool:
        return dict(zip((p.name for p in files), pool.map(_sha256, files), strict=True))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return f"sha256:{h.hexdigest()}"


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


class _Workers:
    """The merge's worker threads, each with its own Workspace; the calling thread is worker 0. torch runs
    each op on the thread that calls it (intra-op threads are set to 1 meanwhile), so the workers keep
    the cores busy without torch's thread pool spinning against them on a loaded machine."""

    def __init__(self, n_models: int, workers: int) -> None:
        self.ws = [Workspace(n_models) for _ in range(workers)]
        self.pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="corral-merge") if workers > 1 else None
        self._out: torch.Tensor | None = None

    def out_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A merged piece's buffer, reused piece after piece (the writer copies each piece out before the
        next): fresh memory would cost a page fault per 4 KiB of output."""
        import torch

        nbytes = numel * dtype.itemsize
        if self._out is None or self._out.numel() < nbytes:
            self._out = None
            self._out = torch.empty(nbytes, dtype=torch.uint8)
        return self._out[:nbytes].view(dtype)

    def run(self, tasks: list[Callable[[Workspace], Any]]) -> list[Any]:
        """Each task on its own worker (at most one task per worker); the results in task order."""
        if len(tasks) > len(self.ws):
            raise ValueError(f"{len(tasks)} tasks for {len(self.ws)} workers")
        if self.pool is None or len(tasks) == 1:
            return [task(self.ws[0]) for task in tasks]
        futures = [self.pool.submit(task, ws) for task, ws in zip(tasks[1:], self.ws[1:], strict=False)]
        first = tasks[0](self.ws[0])
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


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
                  params: MergeParams, workers: _Workers) -> int:
    """Write one merged tensor; returns how many times each input's tensor was read."""
    tm = TensorMerge(info.name, info.numel, params, key_dtype=out_dt)
    parts = len(workers.ws)

    def observe(k: int, offset: int, pieces: list[torch.Tensor]) -> None:
        flat = [p.reshape(-1) for p in pieces]
        results = workers.run([lambda ws, lo=lo, hi=hi: tm.observe(k, ws, offset, flat[0], flat[1:], lo, hi)
                               for lo, hi in spans(flat[0].numel(), parts)])
        for partial in results:
            tm.absorb(k, partial)

    for k in range(tm.passes):
        _stream(sources, info, lambda _i, off, pieces, k=k: observe(k, off, pieces))
        tm.end_pass(k)

    def merge_piece(_index: int | slice, offset: int, pieces: list[torch.Tensor]) -> None:
        flat = [p.reshape(-1) for p in pieces]
        out = workers.out_buffer(flat[0].numel(), out_dt)
        budgets = tm.tie_budgets()
        tied = [i for i, b in enumerate(budgets) if b > 0]

        def span(ws: Workspace, lo: int, hi: int) -> list[int]:
            left = budgets
            if tied and lo:  # the ties before this span, in flat order, come first
                before = tm.count_ties(ws, flat[0], flat[1:], 0, lo, tied)
                left = [max(0, b - c) for b, c in zip(budgets, before, strict=True)]
            return tm.merge(ws, offset, flat[0], flat[1:], out, lo, hi, left)

        used = workers.run([lambda ws, lo=lo, hi=hi: span(ws, lo, hi) for lo, hi in spans(out.numel(), parts)])
        tm.spend([sum(u) for u in zip(*used, strict=True)])
        writer.write(info.name, out.reshape(pieces[0].shape))

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
                  extra_op: dict[str, Any] | None = None, shards: Collection[int] | None = None,
                  max_shard_bytes: int | None = None, tensor_params: TensorParams | None = None) -> WeightMergeResult:
    """Merge full fine-tunes of `base` by a mergekit method into an HF checkpoint, streamed and stamped.

    `method` is one of METHODS; for `linear` the models are averaged (weighted) and the base only supplies
    the config and tokenizer (list it among `models` to average it too). `weights`/`densities`: one value
    for all models or one each; `normalize`/`rescale` default as in mergekit; `t` is SLERP's factor
    (0: the base); `seed` makes DARE's masks (per tensor, input and block). `dtype` auto/bf16/f16/f32
    (auto: the base's); the math is float32 throughout. The output appears only once complete. `base` and
    `models` may be Hub repo ids (`org/name`, not an existing path): fetched into the cache first
    (`toolbox.merge.fetch`), named by their id, repo and commit in the provenance. `shards`/`max_shard_bytes`: as
    `merge_adapters` (statistics are per tensor: a shards= run merges only its files' tensors, byte for byte).
    `tensor_params` (mergekit gradients and filters, `toolbox.merge.params`) gives each tensor its own
    parameters in place of the lists above; their settings, as written, go into the provenance.
    """
    from toolbox.merge.fetch import resolve_input
    from toolbox.tensors.atomic import atomic_directory, check_output_path, ensure_free_space
    from toolbox.tensors.sink import DEFAULT_MAX_SHARD_BYTES, SafetensorsWriter
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
    split = [split_lora(m) for m in [base, *models]]
    loras = [lora for _m, lora in split]
    base_model, *resolved = [resolve_input(m, progress) for m, _lora in split]  # Hub repo ids fetched first
    for m in [base_model, *resolved]:
        if not m.path.exists():
            raise BadInputError(f"{m.path}: no such checkpoint", path=m.path, hint="check the path")
    base_src = _open_input(base_model, loras[0], opts)
    sources = [base_src]
    try:
        sources += [_open_input(m, lora, opts) for m, lora in zip(resolved, loras[1:], strict=True)]
        _check_same_shape(base_model, base_src, resolved, sources[1:])
        infos = base_src.infos()
        per_tensor = tensor_params.resolve(infos, base_model.checkpoint, seed) if tensor_params else {}
        settings, shared = tensor_params.describe() if tensor_params else (None, {})
        out_st = {n: (requested or i.dtype) if i.dtype in FLOAT_ST else i.dtype for n, i in infos.items()}
        stamp, described = _stamp(base_model, base_src, resolved, params, key, opts,
                                  {**shared, **(extra_op or {})}, loras, settings)
        result = WeightMergeResult(out, method, len(infos), requested or "auto", described, name=stamp.name)
        with atomic_directory(out, force=force) as staging:
            writer = SafetensorsWriter(staging, metadata=stamp.safetensors_metadata(), shards=shards,
                                       max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
            for name, info in infos.items():
                writer.add(name, info.shape, out_st[name])
            writer.begin()
            infos = {n: i for n, i in infos.items() if writer.wanted(n)}  # a shards= run: its files' tensors only
            ensure_free_space(out, sum(TensorInfo(n, i.shape, out_st[n]).nbytes for n, i in infos.items()),
                              f"the merged checkpoint {out.name}")
            with progress.task("merging", total=sum(i.nbytes for i in infos.values()), unit="bytes") as task, \
                    _single_threaded_ops():
                workers = _Workers(len(sources) - 1, WORKERS)
                try:
                    for name, info in infos.items():
                        reads = _write_tensor(sources, writer, info, out_st[name], per_tensor.get(name, params),
                                              workers)
                        result.passes[str(reads)] = result.passes.get(str(reads), 0) + 1
                        task.advance(info.nbytes)
                finally:
                    workers.close()
            writer.finish()
            if writer.writes_rest:
                finish_hf_directory(staging, base_model.directory,
                                    _out_config(base_model.checkpoint.config, requested), stamp)
    finally:
        for s in sources:
            s.close()
    return result


@contextlib.contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """torch's intra-op threads set to 1 while the merge's own workers run (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_tensor(sources: list[TensorSource], writer: Any, info: TensorInfo, out_st: str,
                  params: MergeParams, workers: _Workers) -> int:
    """A float tensor merged; anything else (none in Llama 4 today) copied from the base."""
    import torch

    from toolbox.tensors.dtypes import TORCH_NAME

    if info.dtype not in FLOAT_ST:
        writer.write(info.name, sources[0].load(info.name))
        return 1
    return _merge_tensor(sources, writer, info, getattr(torch, TORCH_NAME[out_st]), params, workers)


def split_lora(spec: ModelLike) -> tuple[ModelLike, str | None]:
    """mergekit's `MODEL+LORA` input (a PEFT adapter applied to MODEL first): (MODEL, LORA); a path that
    exists as written, or any other reference, is (spec, None)."""
    text = str(spec) if isinstance(spec, (str, Path)) else ""
    if "+" not in text or Path(text).exists():
        return spec, None
    model, _, lora = text.partition("+")
    if not model or not lora or "+" in lora:
        raise UsageError(f"{text!r} is not MODEL+LORA", hint="one '+' between a checkpoint and a PEFT adapter")
    if not Path(lora).is_dir():
        raise BadInputError(f"{lora}: no such adapter directory (in {text!r})", path=Path(lora),
                            hint="MODEL+LORA names a PEFT adapter directory after the '+'")
    return model, lora


def _open_input(model: ResolvedModel, lora: str | None, opts: LicenseOptions) -> TensorSource:
    """The input's canonical tensors; with a LoRA, merged into them piece by piece as they are read (the
    bytes `corral merge MODEL LORA` would write, in MODEL's dtype)."""
    if lora is None:
        source = model.open_source()
        stored = source.stored()
        if hasattr(stored, "reuse_buffers"):  # pieces are dropped as the stream moves on: reuse their buffers
            stored.reuse_buffers = True
        return source
    from toolbox.merge.merged_source import open_merged

    return open_merged(model, [lora], license_options=opts)


def _stamp(base: ResolvedModel, base_src: TensorSource, models: list[ResolvedModel], params: MergeParams,
           dtype: str, opts: LicenseOptions, extra_op: dict[str, Any] | None,
           loras: list[str | None], settings: list[dict[str, Any]] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """relation merge; every input's (and its LoRA's) file hashes in the provenance, the parameters in the op."""
    from toolbox.hub.manifest import source_origin

    sources: dict[str, str] = {}
    described = []
    labels: set[str] = set()
    for i, m in enumerate([base, *models]):
        name = m.label if loras[i] is None else f"{m.label}+{Path(str(loras[i])).name}"
        label = name if name not in labels else f"{name}#{i}"
        labels.add(label)
        hashes = input_hashes(m)
        if loras[i] is not None:
            hashes.update({f"lora/{k}": v for k, v in _dir_hashes(Path(str(loras[i])), ".json").items()})
        sources.update({f"{label}/{k}": v for k, v in hashes.items()})
        entry: dict[str, Any] = {"name": label, "role": "base" if i == 0 else "model",
                                 "sha256": {k: v.removeprefix("sha256:") for k, v in hashes.items()}}
        origin = source_origin(m.directory)  # a download (a Hub repo id, or corral download's directory)
        if origin.get("base_model"):
            entry["origin"] = {"repo": origin["base_model"], "commit": origin.get("base_revision")}
        if i:
            entry["weight"] = params.weights[i - 1]
            if SPECS[params.method].sparsify:
                entry["density"] = params.densities[i - 1]
            entry.update(settings[i - 1] if settings else {})  # gradients and filters as the config gave them
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
