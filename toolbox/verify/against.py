"""`corral verify GGUF --against HF_DIR`: the GGUF's weights against the checkpoint it came from.

Each text tensor of the reference is rebuilt from the GGUF the way `convert --to hf` rebuilds it
(experts re-fused and transposed back, dequantized), one expert slice at a time, and compared
with the reference tensor: relative RMS error ||gguf - ref|| / ||ref|| over the whole tensor and
the largest absolute difference. Lossless storage (F32, or the reference's own float type) must
be bit-exact; every other type has a tolerance on the relative error.

The tolerances are about twice the error each quantizer makes on Gaussian weights (std 0.02,
measured with gguf-py for the types it implements; for the K- and I-quants, llama.cpp's
published perplexity ordering placed between those points). Real weights with outliers can come
closer to the limit; a GGUF made from another checkpoint lands near 1.4.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError
from toolbox.progress import NULL_PROGRESS, Progress

# relative RMS error allowed per GGUF tensor type
TOLERANCE: dict[str, float] = {
    "F32": 1e-6, "F16": 1e-3, "BF16": 5e-3,
    "Q8_0": 0.012, "Q6_K": 0.025, "Q5_0": 0.09, "Q5_1": 0.08, "Q5_K": 0.07,
    "Q4_0": 0.18, "Q4_1": 0.16, "Q4_K": 0.14, "IQ4_NL": 0.16, "IQ4_XS": 0.16, "MXFP4": 0.23,
    "Q3_K": 0.3, "IQ3_S": 0.3, "IQ3_XXS": 0.35, "Q2_K": 0.5, "IQ2_S": 0.55, "IQ2_XS": 0.6, "IQ2_XXS": 0.65,
    "IQ1_M": 0.8, "IQ1_S": 0.85,
    # ternary types round every weight to {-1, 0, 1} x scale: meaningful only for ternary-trained models
    "TQ1_0": 0.9, "TQ2_0": 0.9,
}
_LOSSLESS = {("F32", "F32"), ("F32", "BF16"), ("F32", "F16"), ("BF16", "BF16"), ("F16", "F16")}


def _exact(gguf_type: str, ref_dtype: str) -> bool:
    return (gguf_type, ref_dtype) in _LOSSLESS


def _errors(slices: Any, source: Any, name: str) -> tuple[float, float]:
    """(relative RMS error, max |diff|) of the rebuilt tensor against the reference, slice by slice."""
    import torch

    sse = ssr = max_abs = 0.0
    for index, got in slices:
        want = (source.load(name) if index is None else source.load_slice(name, index)).float()
        diff = got.float() - want
        sse += float(torch.sum(diff.double() ** 2))
        ssr += float(torch.sum(want.double() ** 2))
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    rel = math.sqrt(sse / ssr) if ssr > 0 else (0.0 if sse == 0 else math.inf)
    return rel, max_abs


def _rebuilt(g: Any, name: str, want_shape: tuple[int, ...], report: Any, global_map: Any,
             vision_map: dict[str, str] | None, mm: Any) -> tuple[str, Any] | None:
    """(GGUF type, slices of the tensor rebuilt in the reference's layout), or None after a finding."""
    from converters.gguf_to_hf import gguf_sources, hf_slices

    if vision_map is not None:
        gg = vision_map[name]
        if math.prod(g.shape(gg)) != math.prod(want_shape):
            report.add("against.shape", "error", f"{name}: the mmproj holds {list(g.shape(gg))}, the "
                       f"reference {list(want_shape)}", tensor=name)
            return None
        return g.type_name(gg), [(None, mm.load(gg).reshape(want_shape))]
    sources = gguf_sources(name, global_map)
    absent = [s for s in sources if s not in g.tensors]
    if absent:
        report.add("against.missing", "error", f"{', '.join(absent)} (for {name}) is not in the GGUF", tensor=name)
        return None
    rebuilt = tuple(g.shape(sources[0]))
    if name.endswith("experts.gate_up_proj"):
        rebuilt = (rebuilt[0], rebuilt[2], 2 * rebuilt[1])
    elif name.endswith("experts.down_proj"):
        rebuilt = (rebuilt[0], rebuilt[2], rebuilt[1])
    if rebuilt != want_shape:
        report.add("against.shape", "error", f"{name}: the GGUF holds {list(rebuilt)}, the reference "
                   f"{list(want_shape)}", tensor=name)
        return None
    return g.type_name(sources[0]), hf_slices(g, name, want_shape, global_map)


def verify_against(gguf_path: str | Path, reference: str | Path, report: Any,
                   progress: Progress = NULL_PROGRESS) -> None:
    """Add `against.*` findings (and per-tensor errors in `report.tensor_stats`) to `report`.

    A text GGUF is compared on the text tensors, an mmproj on the vision tower and projector."""
    from converters.gguf_to_hf import global_names
    from toolbox.checkpoint import load_checkpoint
    from toolbox.reference import open_source, resolve_path
    from toolbox.tensors.gguf.reader import GGUFFile

    try:
        g = GGUFFile(gguf_path)
        ref_root = resolve_path(reference, progress=progress)
        ckpt = load_checkpoint(ref_root)
        source = open_source(ref_root)
    except CorralError as exc:
        report.add("against.unreadable", "fatal", exc.message, path=str(exc.path) if exc.path else None)
        return
    global_map = global_names(ckpt)
    infos = source.infos()
    expected = ckpt.expected_tensors()
    text_names = [n for n in expected if n.startswith(ckpt.text_prefix) or n == ckpt.lm_head_name]
    if ckpt.text.tie_embeddings:
        text_names = [n for n in text_names if n != ckpt.lm_head_name]
    mmproj = g.architecture == "clip"
    mm: Any = None
    vision_map: dict[str, str] = {}
    if mmproj:  # the vision tower and projector, in llama.cpp's mmproj layout
        from converters.gguf_mmproj_to_hf import MmprojFile

        try:
            mm = MmprojFile(gguf_path)
            vision_map = mm.gguf_names([n for n in expected if n not in text_names and n != ckpt.lm_head_name])
        except CorralError as exc:
            report.add("against.unreadable", "fatal", exc.message, path=str(gguf_path))
            return
        names = list(vision_map)
    else:
        names = text_names
    skipped = len(expected) - len(names)
    compared, worst = 0, (0.0, "")
    with source, progress.task("comparing", total=len(names), unit="tensors") as task:
        for name in names:
            task.advance()
            if name not in infos:
                report.add("against.reference-missing", "error", f"the reference has no tensor {name}", tensor=name)
                continue
            info = infos[name]
            rebuilt = _rebuilt(g, name, tuple(info.shape), report, global_map, vision_map if mmproj else None,
                               mm if mmproj else None)
            if rebuilt is None:
                continue
            gguf_type, slices = rebuilt
            rel, max_abs = _errors(slices, source, name)
            exact = _exact(gguf_type, info.dtype)
            tol = 0.0 if exact else TOLERANCE.get(gguf_type, 1.0)
            report.tensor_stats[name] = {"gguf_type": gguf_type, "rel_rms_error": rel, "max_abs_error": max_abs,
                                         "tolerance": tol}
            compared += 1
            if rel > worst[0]:
                worst = (rel, name)
            if (max_abs > 0) if exact else not rel <= tol:
                what = "differs (expected bit-exact)" if exact else f"relative error {rel:.4g} > {tol:g}"
                report.add("against.mismatch", "error", f"{name} ({gguf_type}): {what}; max |diff| {max_abs:.4g}",
                           tensor=name)
    report.checked["against"] = {"reference": str(ref_root), "tensors_compared": compared,
                                 "not_in_gguf_by_design": skipped, "worst": {"tensor": worst[1], "rel_rms_error":
                                                                             worst[0]}}
    if skipped:
        what = "text tensors of the reference are not in an mmproj (they go into the text GGUF)" if mmproj else \
            "vision tensors of the reference are not in a text GGUF (they go into the mmproj file)"
        report.add("against.not-in-file", "info", f"{skipped} {what}")
    report.add("against.compared", "info", f"{compared} tensors compared with {ref_root}; worst relative error "
               f"{worst[0]:.3g}" + (f" ({worst[1]})" if worst[1] else ""))
