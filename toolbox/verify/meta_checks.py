"""`inspect` and `verify` for Meta's original format (params.json + consolidated.NN.pth).

verify checks params.json against the shards: every tensor the derived config implies is there with its
shape (after the ranks' parts are joined), nothing is left over, the vocabulary and the widths agree with
what llama_models computes from params.json, and (`--deep`) every value is finite.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorralError
from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from toolbox.reference import ResolvedModel
    from toolbox.verify.checks import VerifyReport

LICENSE_FILES = ("LICENSE", "NOTICE", "USE_POLICY.md", "README.md")


def inspect_meta(model: ResolvedModel) -> dict[str, Any]:
    """The `inspect` document of a Meta-format checkpoint (from the pickles' metadata; no weights read)."""
    from toolbox.tensors.meta_source import MetaSource

    ckpt = model.checkpoint
    meta = model.meta_dir
    assert meta is not None
    src = MetaSource(meta)
    try:
        info: dict[str, Any] = {
            "path": str(model.path), "format": "meta-original", "architecture": ckpt.architecture,
            "variant": ckpt.variant, "shaped_like": ckpt.family, "multimodal": ckpt.multimodal,
            "parameters": {**ckpt.parameter_counts(), "stored": sum(i.numel for i in src.infos().values())},
            **ckpt.summary(),
            "dtypes": dict(Counter(i.dtype for i in src.infos().values())),
            "layout": "meta-original", "fp8": False,
            "shards": {"count": len(src.files), "bytes": sum(f.stat().st_size for f in src.files),
                       "model_parallel": len(src.files)},
            "tokenizer": _tokenizer(ckpt.path),
            "license_files": {n: (model.path / n).is_file() or (meta / n).is_file() for n in LICENSE_FILES},
        }
    finally:
        src.close()
    return info


def _tokenizer(directory: Any) -> dict[str, Any]:
    """The tokenizer an HF conversion gets: the Llama 4 tokenizer built from the llama-models package."""
    from toolbox.tokenizer_files import load_tokenizer_files

    try:
        tok = load_tokenizer_files(directory)
    except CorralError as exc:
        return {"error": exc.message}
    return {"vocab_size": tok.vocab_size, "bos": tok.special_token("bos_token"), "eos": tok.special_token("eos_token"),
            "pad": tok.special_token("pad_token"), "chat_template": tok.chat_template is not None,
            "source": "llama-models"}


def verify_meta(model: ResolvedModel, report: VerifyReport, *, deep: bool = False,
                progress: Progress = NULL_PROGRESS) -> None:
    """Add the findings of a Meta-format checkpoint to `report` (never raises for problems in the files)."""
    from toolbox.tensors.meta_source import MetaSource

    meta = model.meta_dir
    assert meta is not None
    try:
        ckpt = model.checkpoint
        src = MetaSource(meta)
    except CorralError as exc:
        report.add("meta.unreadable", "fatal", exc.message, path=exc.path)
        return
    try:
        report.checked["format"] = "meta-original"
        report.checked["model_parallel"] = len(src.files)
        _inventory(ckpt.expected_tensors(), src, report)
        _params(src, report)
        tok = _tokenizer(ckpt.path)
        if tok.get("vocab_size", 0) > ckpt.text.vocab:
            report.add("meta.tokenizer-vocab", "warning", f"{meta}: the Llama 4 tokenizer has {tok['vocab_size']} "
                       f"tokens, the embedding {ckpt.text.vocab} rows (not a Llama 4 vocabulary)", path=str(meta))
        if deep:
            _finite(src, report, progress)
    finally:
        src.close()


def _inventory(expected: dict[str, tuple[int, ...]], src: Any, report: VerifyReport) -> None:
    infos = src.infos()
    where = str(src.path)
    missing = [n for n in expected if n not in infos]
    extra = [n for n in infos if n not in expected]
    wrong = [f"{n} {list(infos[n].shape)} (params.json implies {list(s)})"
             for n, s in expected.items() if n in infos and tuple(infos[n].shape) != tuple(s)]
    for code, items, what in (("meta.missing", missing, "missing"), ("meta.unexpected", extra, "not implied by "
                              "params.json"), ("meta.shape", wrong, "with the wrong shape")):
        if items:
            report.add(code, "error", f"{where}: {len(items)} tensors {what}: {', '.join(items[:5])}", path=where)
    report.checked["tensors"] = len(infos)
    if not (missing or extra or wrong):
        report.add("meta.inventory", "info", f"{where}: all {len(expected)} tensors params.json implies, "
                   f"joined from {len(src.files)} shard(s)", path=where)


def _params(src: Any, report: VerifyReport) -> None:
    """params.json's own numbers against the tensors: vocab_size and llama_models' width formulas."""
    from toolbox.meta_config import dense_width

    p = src.params
    path = str(src.path / "params.json")
    infos = src.infos()
    embed = infos.get("model.embed_tokens.weight") or infos.get("language_model.model.embed_tokens.weight")
    if embed is not None and p.get("vocab_size") not in (None, embed.shape[0]):
        report.add("meta.vocab", "warning", f"{path}: vocab_size {p['vocab_size']} but the embedding has "
                   f"{embed.shape[0]} rows", path=path)
    dense = next((i for n, i in infos.items() if n.endswith("feed_forward.gate_proj.weight")), None)
    if dense is not None and dense.shape[0] != dense_width(int(p["dim"]), p):
        report.add("meta.dense-width", "warning", f"{path}: dense layers are {dense.shape[0]} wide; llama_models "
                   f"computes {dense_width(int(p['dim']), p)} from dim, ffn_dim_multiplier and multiple_of", path=path)
    gu = next((i for n, i in infos.items() if n.endswith("experts.gate_up_proj")), None)
    if gu is not None and p.get("ffn_exp") is not None:
        want = _moe_width(p)
        if gu.shape[2] // 2 != want:
            report.add("meta.expert-width", "warning", f"{path}: experts are {gu.shape[2] // 2} wide; llama_models "
                       f"computes {want} from dim, ffn_exp, ffn_dim_multiplier and moe_args", path=path)


def _moe_width(p: dict[str, Any]) -> int:
    """llama_models' routed-expert width (llama4/moe.py MoE.__init__)."""
    moe = p.get("moe_args") or {}
    hidden = int(float(p["ffn_exp"]) * int(p["dim"]))
    hidden = int(2 * hidden / 3)
    hidden = int(float(p.get("ffn_dim_multiplier") or 1.0) * hidden)
    if moe.get("auto_scale_F", True):
        hidden = int(hidden / (float(moe.get("capacity_factor", 1.0)) + 1))
    multiple = int(p.get("multiple_of") or 256)
    return hidden + (-hidden % multiple)


def _finite(src: Any, report: VerifyReport, progress: Progress) -> None:
    """Every value finite, one tensor (one expert) at a time."""
    import torch

    bad: list[str] = []
    infos = src.infos()
    with progress.task("scanning", total=len(infos), unit="tensors") as task:
        for name, info in infos.items():
            parts = ([src.load_slice(name, e) for e in range(info.shape[0])] if name.endswith(
                ("experts.gate_up_proj", "experts.down_proj")) else [src.load(name)])
            if any(not bool(torch.isfinite(t).all()) for t in parts if t.is_floating_point()):
                bad.append(name)
            task.advance()
    if bad:
        report.add("meta.non-finite", "error", f"{src.path}: NaN or Inf in {', '.join(bad[:5])}", path=str(src.path))
    report.checked["deep"] = True
