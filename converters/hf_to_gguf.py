"""HF safetensors (any layout corral reads) -> GGUF for llama.cpp, streamed.

Memory is bounded by one piece in flight: 2-D tensors go in row chunks, fused expert
tensors one expert at a time (split into gate/up and transposed to llama.cpp's layout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters import gguf_mix
from converters.gguf_names import F32_KINDS, gguf_name, kind_of, text_name_map
from license.stamp import LicenseOptions
from toolbox.checkpoint import Llama4Checkpoint
from toolbox.errors import BadInputError, UnsupportedModelError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelLike, resolve
from toolbox.tensors.atomic import check_output_path, ensure_free_space, new_partial
from toolbox.tensors.gguf.quant import FLOAT_TYPES, LLAMA_CPP_OUTTYPES, PY_OUTTYPES, can_encode, encode, nbytes
from toolbox.tensors.source import TensorSource

ROW_CHUNK_BYTES = 64 * 1024**2
PROVENANCE_KEY = "corral.hf_config"  # the source config.json, so GGUF -> HF can restore what GGUF cannot hold
LLAMA_CPP_CHUNK = 8192  # llama.cpp hard-codes these for arch llama4 (src/models/llama4.cpp)
LLAMA_CPP_NOPE_INTERVAL = 4
LLAMA_CPP_TEMP = {"attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1}


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: str
    pieces: Callable[[], Iterator[Any]]  # float tensors whose rows, concatenated, form the tensor
    source: str
    imatrix: Any = None  # converters.gguf_imatrix.ImatrixRows: the importance weights ggml gets, or None

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)


@dataclass
class GGUFResult:
    paths: list[Path]
    outtype: str
    tensors: int
    bytes: int
    warnings: list[str] = field(default_factory=list)
    name: str = ""


def llama_cpp_incompatibilities(ckpt: Llama4Checkpoint) -> list[str]:
    """What llama.cpp would silently run differently from transformers (its llama4 graph hard-codes the
    chunk size, the NoPE interval and temperature tuning: src/models/llama4.cpp)."""
    t = ckpt.text
    tc = ckpt.config.get("text_config") or ckpt.config
    problems = []
    if t.chunk_size not in (None, LLAMA_CPP_CHUNK):
        problems.append(f"attention_chunk_size={t.chunk_size} (llama.cpp always uses {LLAMA_CPP_CHUNK})")
    default_rope = tuple((i + 1) % LLAMA_CPP_NOPE_INTERVAL != 0 for i in range(t.layers))
    if t.rope_layers != default_rope:
        problems.append(f"NoPE layers {list(t.nope_layers)} (llama.cpp always uses every 4th layer)")
    for key, want in LLAMA_CPP_TEMP.items():
        if key in tc and tc[key] != want and not (key == "attn_temperature_tuning" and bool(tc[key]) == want):
            problems.append(f"{key}={tc[key]} (llama.cpp always uses {want})")
    if t.qk_norm != (t.experts != 128):
        problems.append(f"use_qk_norm={t.qk_norm} with {t.experts} experts (llama.cpp turns qk-norm on exactly "
                        "when the expert count is not 128)")
    if t.interleave_step > 0 and tuple(t.moe_layers) != tuple(range(t.interleave_step - 1, t.layers,
                                                                      t.interleave_step)):
        problems.append(f"moe_layers {list(t.moe_layers)} (llama.cpp derives them from interleave_moe_layer_step)")
    if t.experts == 0:
        problems.append("no experts (llama.cpp's llama4 needs a MoE model)")
    if t.attention_bias:
        problems.append("attention biases (llama.cpp's llama4 has none)")
    if t.rope_type not in ("default", "llama3"):
        problems.append(f"rope type {t.rope_type!r} (only default and llama3 scaling are converted)")
    return problems


def resolve_outtype(outtype: str, source: TensorSource) -> str:
    """'auto' keeps the source's float type (FP8 becomes bf16); otherwise the GGUF type name."""
    if outtype == "auto":
        dtypes = {i.dtype for i in source.infos().values()}
        for st, gg in (("F32", "F32"), ("BF16", "BF16"), ("F16", "F16")):
            if st in dtypes:
                return gg
        return "BF16"
    key = outtype.lower()
    if key in LLAMA_CPP_OUTTYPES:
        return key.upper()  # a llama.cpp mix (Q4_K_M): converters.gguf_mix gives each tensor its type
    if key not in PY_OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r}",
                         hint=f"choose from auto, {', '.join(PY_OUTTYPES)}, {', '.join(LLAMA_CPP_OUTTYPES)}")
    return PY_OUTTYPES[key]


def _row_pieces(source: TensorSource, name: str, transform: Callable[[Any], Any] | None = None
                ) -> Callable[[], Iterator[Any]]:
    info = source.infos()[name]

    def gen() -> Iterator[Any]:
        if len(info.shape) < 2:
            t = source.load(name)
            yield transform(t) if transform else t
            return
        row_bytes = math.prod(info.shape[1:]) * (info.nbytes // max(info.numel, 1))
        step = max(1, ROW_CHUNK_BYTES // max(row_bytes, 1))
        for r in range(0, info.shape[0], step):
            t = source.load_slice(name, slice(r, min(r + step, info.shape[0])))
            yield transform(t) if transform else t

    return gen


def _expert_pieces(source: TensorSource, name: str, which: str, width: int) -> Callable[[], Iterator[Any]]:
    experts = source.infos()[name].shape[0]

    def gen() -> Iterator[Any]:
        for e in range(experts):
            t = source.load_slice(name, e)  # gate_up: [H, 2I]; down: [I, H]
            # transposed views: ggml's encoder reads them in tiles, the others copy them (quant.dense)
            if which == "gate":
                yield t[:, :width].T
            elif which == "up":
                yield t[:, width:].T
            else:
                yield t.T

    return gen


def _gate_up_pairs(source: TensorSource, name: str, width: int) -> Callable[[], Iterator[Any]]:
    """(gate [I, H], up [I, H]) per expert from one read of the fused gate_up [H, 2I] slice (transposed views)."""
    experts = source.infos()[name].shape[0]

    def gen() -> Iterator[Any]:
        for e in range(experts):
            t = source.load_slice(name, e)
            yield t[:, :width].T, t[:, width:].T

    return gen


def read_once(source: TensorSource) -> None:
    """Tell the source that each byte will be read once (it may keep them out of the page cache) and that its
    results are dropped as the stream moves on (it may reuse their buffers)."""
    source.drop_after_read = True
    source.reuse_buffers = True


def _rope_freqs(ckpt: Llama4Checkpoint) -> Any | None:
    """llama3 rope scaling as llama.cpp's per-dimension frequency factors (None if not llama3)."""
    import torch

    tc = ckpt.config.get("text_config") or ckpt.config
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    base = rope.get("rope_theta", tc.get("rope_theta", 500000.0))
    dim = ckpt.text.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def plan_text(ckpt: Llama4Checkpoint, source: TensorSource, outtype: str) -> list[Planned]:
    """Every text tensor of the GGUF, in file order, with its type and lazy pieces."""
    infos = source.infos()
    names = text_name_map(ckpt)
    plan: list[Planned] = []

    def qtype_for(kind: str, shape: tuple[int, ...]) -> str:
        if kind in F32_KINDS or len(shape) < 2:
            return "F32"
        if outtype in FLOAT_TYPES or can_encode(outtype, shape[-1]):
            return outtype
        return "F16"  # rows not a multiple of the block size: llama.cpp's converter falls back the same way

    freqs = _rope_freqs(ckpt)
    if freqs is not None:
        plan.append(Planned(gguf_name("ROPE_FREQS"), tuple(freqs.shape), "F32", lambda f=freqs: iter([f]),
                            "(llama3 rope scaling)"))
    emitted = set()
    for hf_name, gg_name in names.items():
        if hf_name not in infos:
            continue
        shape = infos[hf_name].shape
        kind = kind_of(gg_name) or ""
        plan.append(Planned(gg_name, shape, qtype_for(kind, shape), _row_pieces(source, hf_name), hf_name))
        emitted.add(hf_name)
        # experts go right after the router of their block
        if hf_name.endswith("feed_forward.router.weight"):
            block = hf_name.removesuffix("router.weight")
            bid = int(hf_name.split(".layers.")[1].split(".")[0])
            gu, dn = f"{block}experts.gate_up_proj", f"{block}experts.down_proj"
            experts, hidden, two_i = infos[gu].shape
            width = two_i // 2
            for which, kind_name in (("gate", "FFN_GATE_EXP"), ("up", "FFN_UP_EXP")):
                shp = (experts, width, hidden)
                plan.append(Planned(gguf_name(kind_name, bid), shp, qtype_for(kind_name, shp),
                                    _expert_pieces(source, gu, which, width), gu))
            shp = (experts, hidden, infos[dn].shape[1])
            plan.append(Planned(gguf_name("FFN_DOWN_EXP", bid), shp, qtype_for("FFN_DOWN_EXP", shp),
                                _expert_pieces(source, dn, "down", width), dn))
            emitted.update({gu, dn})
    text_names = {n for n in infos if n.startswith(ckpt.text_prefix) or n == ckpt.lm_head_name}
    leftover = sorted(text_names - emitted)
    if leftover:
        raise BadInputError(f"{source.path}: tensors with no GGUF mapping: {', '.join(leftover[:5])}",
                            hint="run `corral verify` on the checkpoint", path=source.path)
    return plan


def add_text_kv(writer: Any, ckpt: Llama4Checkpoint, outtype: str) -> None:
    import gguf

    t = ckpt.text
    tc = ckpt.config.get("text_config") or ckpt.config
    writer.add_block_count(t.layers)
    writer.add_context_length(int(tc.get("max_position_embeddings", 131072)))
    writer.add_embedding_length(t.hidden)
    writer.add_feed_forward_length(t.dense_width)
    writer.add_expert_feed_forward_length(t.expert_width)
    writer.add_head_count(t.heads)
    writer.add_head_count_kv(t.kv_heads)
    writer.add_key_length(t.head_dim)
    writer.add_value_length(t.head_dim)
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", tc.get("rope_theta", 500000.0))))
    writer.add_rope_dimension_count(t.head_dim)
    writer.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-5)))
    writer.add_expert_count(t.experts)
    writer.add_expert_used_count(t.top_k)
    writer.add_interleave_moe_layer_step(t.interleave_step)
    writer.add_vocab_size(t.vocab)
    floats = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16}
    ftype = floats[outtype] if outtype in floats else getattr(gguf.LlamaFileType, f"MOSTLY_{outtype}")
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def convert_hf_to_gguf(src: ModelLike, out: str | Path, *, outtype: str = "auto", split_max_size: int = 0,
                       allow_lossy_config: bool = False, force: bool = False, multimodal: bool = False,
                       direct_io: bool = True, license_options: LicenseOptions | None = None,
                       progress: Progress = NULL_PROGRESS, overrides: gguf_mix.Overrides | None = None,
                       imatrix: str | Path | None = None, include_weights: list[str] | None = None,
                       exclude_weights: list[str] | None = None, parts: Collection[int] | None = None,
                       keep_float: Collection[str] | None = None, **legacy: Any) -> GGUFResult:
    """Convert an HF Llama 4 checkpoint to a GGUF file (or split set) for llama.cpp.

    `parts` (0-based, of `split_part_count`): only those files of the split set, each as the whole run writes it.

    `direct_io` lays tensors out at 4096-byte alignment (general.alignment) and writes their data
    around the page cache (toolbox.tensors.direct_io); False keeps GGUF's default 32 and buffered
    writes (the input of llama.cpp's quantizer must: it copies general.alignment into its output
    but lays that out at 32).

    `overrides` are llama-quantize's per-tensor options (gguf_mix.Overrides); `imatrix` an importance
    matrix file (llama.cpp's GGUF format or the legacy .dat), filtered by `include_weights` /
    `exclude_weights`; both need a mix --outtype and give the file llama-quantize would write.

    `multimodal` marks the stamp as part of a multimodal model (set when its mmproj file ships
    beside it, so that the pair carries the same obligations, the EU clause included).
    The license stamp goes into the file: a name beginning with "Llama" and a declaration
    about the 700M MAU threshold are required (LicensePolicyError, exit 5, otherwise);
    `license_options` (or the keywords name=, mau_declaration=, fix_name=, base_model=) give them.
    """
    import gguf

    from converters.gguf_vocab_fork import VocabJob
    from license.stamp import apply_to_gguf_writer, derive_stamp
    from toolbox.tensors.gguf.ggml import reused_outputs
    from toolbox.tensors.gguf.writer import GGUFWriter

    opts = LicenseOptions.of(license_options, **legacy)
    model = resolve(src)
    ckpt = model.checkpoint
    assert ckpt.path is not None
    warnings = _lossy_config(ckpt, allow_lossy_config)
    out = Path(out).absolute()
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf")
    check_output_path(out, force=force)
    vocab = VocabJob(ckpt.path, ckpt.text.vocab)  # tokenizer keys built in a child while torch loads, the plan forms
    source = model.open_source()
    gg_type = resolve_outtype(outtype, source)
    # a source corral made (a merge, a prune) keeps its history and relation
    imat = _load_imatrix(imatrix, include_weights, exclude_weights)
    stamp = derive_stamp(model.stamp_input(source), _operation(gg_type, overrides, imat, keep_float), opts,
                         suffix=gg_type.lower(), multimodal=multimodal,
                         relation=None if gg_type in FLOAT_TYPES else "quantized")
    plan = _typed_plan(ckpt, source, gg_type, imat, overrides, keep_float)
    ensure_free_space(out.parent, sum(p.nbytes + 4096 for p in plan), f"the GGUF output {out.name}")  # + alignment
    staging = new_partial(out, directory=True)  # owned by this run: a later run removes it if this one dies
    try:
        writer = GGUFWriter(staging / out.name, "llama4", split_max_size=split_max_size, direct_io=direct_io,
                            parts=parts)
        apply_to_gguf_writer(writer, stamp)
        add_text_kv(writer, ckpt, gg_type)
        vocab.apply(writer)
        writer.add_string(PROVENANCE_KEY, json.dumps(ckpt.config, sort_keys=True))
        if imat is not None and imat.entries:
            from converters.gguf_imatrix import add_imatrix_kv

            add_imatrix_kv(writer, imat)
        import numpy as np

        for p in plan:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=getattr(
                gguf.GGMLQuantizationType, p.qtype))
        writer.begin_data()
        todo = [p for p in plan if writer.writes(p.name)]
        total = sum(p.nbytes for p in todo)
        read_once(source)  # every byte is read exactly once below: keep it out of the page cache
        with progress.task(f"writing {out.name}", total=total, unit="bytes") as task, reused_outputs():
            _write_tensors(writer, todo, source, task)
        writer.close()
        finals = _publish(staging, out, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        source.close()
    return GGUFResult(paths=finals, outtype=gg_type, tensors=len(plan), bytes=total, warnings=warnings,
                      name=stamp.name)


def split_part_count(src: ModelLike, *, outtype: str = "auto", split_max_size: int = 0,
                     overrides: gguf_mix.Overrides | None = None, imatrix: str | Path | None = None,
                     include_weights: list[str] | None = None, exclude_weights: list[str] | None = None,
                     keep_float: Collection[str] | None = None, **_other: Any) -> int:
    """How many files `convert_hf_to_gguf` writes with these options (1 without a split), from the plan alone
    (headers are read, no tensor data): what a caller fanning the parts out needs before any is written."""
    import gguf
    import numpy as np

    from toolbox.tensors.gguf.writer import GGUFWriter

    model = resolve(src)
    source = model.open_source()
    try:
        gg_type = resolve_outtype(outtype, source)
        plan = _typed_plan(model.checkpoint, source, gg_type, _load_imatrix(imatrix, include_weights,
                                                                            exclude_weights), overrides, keep_float)
    finally:
        source.close()
    writer = GGUFWriter(None, "llama4", split_max_size=split_max_size)
    for p in plan:  # gguf-py's own split rule decides, as in the conversion
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                               raw_dtype=getattr(gguf.GGMLQuantizationType, p.qtype))
    return len(writer.tensors)


def _operation(gg_type: str, overrides: gguf_mix.Overrides | None, imat: Any,
               keep_float: Collection[str] | None = None) -> dict[str, Any]:
    """The provenance record of this conversion: the type, and the per-tensor options and imatrix (by
    file name and entry count) when given, so that the file says how it was made."""
    op: dict[str, Any] = {"op": "convert", "to": "gguf", "outtype": gg_type}
    if overrides is not None and overrides.mix:
        op["mix"] = overrides.mix  # a built-in dynamic mix: its name, then what it expanded to
    if overrides:
        op["overrides"] = {k: v for k, v in (("output_tensor_type", overrides.output_tensor_type),
                                             ("token_embedding_type", overrides.token_embedding_type),
                                             ("pure", overrides.pure),
                                             ("tensor_types", [f"{p}={t}" for p, t in overrides.tensor_types]))
                           if v}
    if imat is not None:
        op["imatrix"] = {"file": Path(imat.path).name, "entries": len(imat.entries)}
    if keep_float:
        from converters.gguf_keep_float import parts_of

        op["keep_float"] = list(parts_of(keep_float))
    return op


def _typed_plan(ckpt: Llama4Checkpoint, source: TensorSource, gg_type: str, imat: Any,
                overrides: gguf_mix.Overrides | None, keep_float: Collection[str] | None = None) -> list[Planned]:
    """The plan with llama.cpp's per-tensor types of a mix (q4_k_m, ...) and the user's overrides (a single
    type: as planned), the --keep-float parts at the source's float type, each quantized tensor with its
    imatrix entry when there is one."""
    from converters import gguf_keep_float

    kept = gguf_keep_float.parts_of(keep_float)
    float_type = resolve_outtype("auto", source) if kept else ""
    if gguf_mix.is_mix(gg_type):
        overrides = gguf_keep_float.mix_overrides(overrides, kept, float_type)
    plan = plan_text(ckpt, source, gguf_mix.unquantized(gg_type))
    gguf_mix.apply(plan, ckpt, gg_type, has_imatrix=bool(imat and imat.entries), overrides=overrides)
    if not gguf_mix.is_mix(gg_type):
        gguf_keep_float.keep_in_plan(plan, kept, float_type)
    if imat is not None and imat.entries:
        from converters.gguf_imatrix import attach

        attach(plan, imat, gguf_mix.ftype_of(gg_type))
    return plan


def _load_imatrix(path: str | Path | None, include: list[str] | None, exclude: list[str] | None) -> Any:
    """The importance matrix file, filtered (None without --imatrix; --include/--exclude-weights need one)."""
    if path is None:
        if include or exclude:
            raise UsageError("--include-weights/--exclude-weights select entries of an --imatrix file",
                             hint="pass --imatrix FILE too")
        return None
    from toolbox.tensors.gguf.imatrix import load_imatrix

    return load_imatrix(path).select(include, exclude)


def _lossy_config(ckpt: Llama4Checkpoint, allow_lossy_config: bool) -> list[str]:
    """The warning for a config llama.cpp cannot represent, or UnsupportedModelError without the opt-in."""
    problems = llama_cpp_incompatibilities(ckpt)
    if not problems:
        return []
    msg = f"{ckpt.path}: llama.cpp cannot represent this config: {'; '.join(problems)}"
    if not allow_lossy_config:
        raise UnsupportedModelError(msg, hint="pass --allow-lossy-config to convert anyway (llama.cpp will "
                                    "run the model differently from transformers)", path=ckpt.path)
    return [msg]


def _write_tensors(writer: Any, plan: list[Planned], source: TensorSource, task: Any) -> None:
    """Every planned tensor in order, encoded piece by piece; a gate/up expert pair in one pass when the
    writer can (both halves come from one fused source tensor).

    Three stages overlap, each in its own thread and one piece ahead of the next (bounded queues): reading
    a piece (preadv), encoding the one before (ggml's kernels on every core), writing the one before that
    (the writer's direct I/O). Memory: about three raw and three encoded pieces."""
    from toolbox.tensors.prefetch import prefetch

    i = 0
    while i < len(plan):
        p = plan[i]
        nxt = plan[i + 1] if i + 1 < len(plan) else None
        if nxt is not None and p.name.endswith("ffn_gate_exps.weight") and \
                nxt.name.endswith("ffn_up_exps.weight") and p.source == nxt.source:

            def pairs(gate: Planned = p, up: Planned = nxt) -> Iterator[Any]:
                reads = prefetch(_gate_up_pairs(source, gate.source, gate.shape[1])(), depth=1)
                for e, (g, u) in enumerate(reads):
                    data = (_encode(g, gate, e), _encode(u, up, e))
                    task.advance(data[0].nbytes + data[1].nbytes)
                    yield data

            if writer.write_expert_pair((p.name, nxt.name), prefetch(pairs(), depth=1)) is not None:
                i += 2
                continue

        def pieces(p: Planned = p) -> Iterator[Any]:
            for e, t in enumerate(prefetch(p.pieces(), depth=1)):  # a 3-D tensor's pieces are its experts
                data = _encode(t, p, e)
                task.advance(data.nbytes)
                yield data

        writer.write_tensor_pieces(p.name, prefetch(pieces(), depth=1))
        i += 1


def _encode(t: Any, p: Planned, expert: int) -> Any:
    """A piece of `p` in its type; with an importance matrix, ggml's kernel gets the piece's row of it
    (expert `expert`'s for a 3-D tensor), as llama-quantize passes it."""
    if p.imatrix is None or p.qtype in FLOAT_TYPES:
        return encode(t, p.qtype)
    from toolbox.tensors.gguf import ggml

    return memoryview(ggml.quantize(t, p.qtype, imatrix=p.imatrix.row(expert), what=p.name))


def _publish(staging: Path, out: Path, *, force: bool) -> list[Path]:
    """Move the finished file (or split set) from `staging` beside `out`, synced, the first shard last:
    until it lands, nothing llama.cpp would open exists."""
    produced = sorted(staging.iterdir())
    for f in produced:
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    check_output_path(out, force=force)
    for f in sorted(produced, key=lambda f: "-00001-of-" in f.name or f.name == out.name):
        os.replace(f, out.parent / f.name)
    return [out.parent / f.name for f in produced]


def expected_gguf_shapes(ckpt: Llama4Checkpoint) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape that a conversion of this config produces."""
    inv = ckpt.expected_tensors()
    out: dict[str, tuple[int, ...]] = {}
    if _rope_freqs(ckpt) is not None:
        out[gguf_name("ROPE_FREQS")] = (ckpt.text.head_dim // 2,)
    for hf_name, gg_name in text_name_map(ckpt).items():
        if hf_name in inv:
            out[gg_name] = inv[hf_name]
    t = ckpt.text
    for bid in t.moe_layers:
        out[gguf_name("FFN_GATE_EXP", bid)] = (t.experts, t.expert_width, t.hidden)
        out[gguf_name("FFN_UP_EXP", bid)] = (t.experts, t.expert_width, t.hidden)
        out[gguf_name("FFN_DOWN_EXP", bid)] = (t.experts, t.hidden, t.expert_width)
    return out
