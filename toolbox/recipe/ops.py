"""What each recipe step does: a thin call into the same library function as the CLI command.

An operation gets its input checkpoint (a directory or a GGUF/ONNX path), a fresh directory to
write into, and its parameters; it returns the artifact it made (a file or a directory inside
`workdir`) or, for gates, None after checking (raising GateFailed on findings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorralError, ExitCode
from toolbox.progress import Progress

if TYPE_CHECKING:
    from license.stamp import LicenseOptions

GATES_OPS = ("verify", "license-check", "publish")
QUANT_OPS = ("convert", "merge", "prune", "extract")  # steps that take the per-tensor GGUF options (`gguf_options`)


class GateFailed(CorralError):
    """A verify or license-check gate found problems (exit 1)."""

    exit_code = ExitCode.FINDINGS


@dataclass(frozen=True)
class OpContext:
    mau_declaration: str | None
    fix_name: bool
    progress: Progress
    resolve: Any  # step id or "source" -> Path of that (already built) checkpoint, for verify --against


def run_op(uses: str, params: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path | None:
    return _OPS[uses](params, src, workdir, ctx)


def _license(ctx: OpContext, p: dict[str, Any]) -> LicenseOptions:
    from license.stamp import LicenseOptions

    return LicenseOptions(name=p.get("name"), mau_declaration=ctx.mau_declaration, fix_name=ctx.fix_name)


def _convert(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    """The same request `corral convert` builds: into `model.gguf` (and `model.mmproj.gguf` with mmproj: auto)
    or the directory `model`; returns the first file or the directory."""
    from toolbox.convert import convert

    return convert(convert_request(p, src, workdir, ctx), progress=ctx.progress).paths[0]


def convert_request(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Any:
    """A convert step's `toolbox.convert.ConvertRequest` (also what the parts of a split GGUF are built from)."""
    from toolbox.convert import ConvertRequest

    to = p["to"]
    return ConvertRequest(src, to, workdir / ("model.gguf" if to == "gguf" else "model"),
                          outtype=p.get("outtype") or "auto", dtype=p.get("dtype") or "auto",
                          split_max_size=p.get("split_max_size") or 0, opset=p.get("opset"),
                          kv_cache=p.get("kv_cache", True), mmproj=p.get("mmproj"),
                          mmproj_outtype=p.get("mmproj_outtype"),
                          allow_lossy_config=p.get("allow_lossy_config", False), license=_license(ctx, p),
                          **gguf_options(p, ctx))


def gguf_options(p: dict[str, Any], ctx: OpContext) -> dict[str, Any]:
    """A step's per-tensor GGUF options (schema.GGUFQuantWith) as `toolbox.convert.gguf_quant_options` and
    `ConvertRequest` name them: a convert step's, and a merge/prune/extract step's with to: gguf."""
    return {"tensor_types": tuple(p.get("tensor_types") or ()), "output_tensor_type": p.get("output_tensor_type"),
            "token_embedding_type": p.get("token_embedding_type"), "pure": bool(p.get("pure")),
            "imatrix": _imatrix_file(p, ctx), "include_weights": tuple(p.get("include_weights") or ()),
            "exclude_weights": tuple(p.get("exclude_weights") or ())}


def is_step_ref(value: Any) -> bool:
    """A step's `imatrix` that is a step id (no dot or slash, unlike a file name) names an imatrix step."""
    import re

    from toolbox.recipe.schema import STEP_ID

    return isinstance(value, str) and re.fullmatch(STEP_ID, value) is not None


def _imatrix_file(p: dict[str, Any], ctx: OpContext) -> Path | None:
    """A step's imatrix: a file, or the artifact of the imatrix step it names (its `against`)."""
    if not p.get("imatrix"):
        return None
    return Path(ctx.resolve(p["imatrix"])) if is_step_ref(p["imatrix"]) else Path(p["imatrix"])


def _imatrix(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    """`corral imatrix` of the input checkpoint into `imatrix.gguf`, for later convert steps' `imatrix`."""
    from toolbox.experts.imatrix import compute_imatrix

    out = workdir / "imatrix.gguf"
    compute_imatrix(src, out, p["calibration"], chunk=int(p.get("chunk") or 512), max_chunks=p.get("chunks"),
                    all_experts=bool(p.get("all_experts")), license_options=_license(ctx, p), progress=ctx.progress)
    return out


def _eval(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    """`corral eval` of the input GGUF against `against` into `eval.json` (corral eval --json's document);
    above `max_kl` or below `min_top1` the step fails (exit 1) and nothing is kept."""
    import json

    from toolbox.experts.quality import evaluate_gguf

    against = ctx.resolve(p.get("against") or "source")
    report = evaluate_gguf([src], against, p["calibration"], ctx=int(p.get("ctx") or 512),
                           chunks=int(p.get("chunks") or 8), progress=ctx.progress)
    v = report.variants[0]
    if p.get("max_kl") is not None and v.kl_mean > float(p["max_kl"]):
        raise GateFailed(f"{src.name}: mean KL divergence {v.kl_mean:.4g} is above max_kl {p['max_kl']}",
                         hint="use more bits (or an imatrix), or raise max_kl", path=src)
    if p.get("min_top1") is not None and v.top1_agreement < float(p["min_top1"]):
        raise GateFailed(f"{src.name}: top-1 agreement {v.top1_agreement:.4f} is below min_top1 {p['min_top1']}",
                         hint="use more bits (or an imatrix), or lower min_top1", path=src)
    doc = report.to_dict()
    doc["source"] = "source" if (p.get("against") or "source") == "source" else p["against"]  # no cache paths
    for var in doc["variants"]:
        var["file"] = src.name
    out = workdir / "eval.json"
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def _merge(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.merge import merge_adapters  # type: ignore[import-not-found]

    out = workdir / "model"
    if p.get("method"):
        from toolbox.merge.weights import merge_weights

        models = p["models"]
        dens = [m["density"] for m in models if m.get("density") is not None]
        merge_weights(src, [m["path"] for m in models], out, method=p["method"],
                      weights=[float(m.get("weight", 1.0)) for m in models],
                      densities=dens if len(dens) == len(models) else None, normalize=p.get("normalize"),
                      t=p.get("t"), seed=int(p.get("seed") or 0), dtype=p.get("dtype"), progress=ctx.progress,
                      license_options=_license(ctx, p), **_sharding(p))
        return out
    adapters = [a["path"] for a in p["adapters"]]
    weights = [float(a.get("weight", 1.0)) for a in p["adapters"]]
    if p.get("to") == "gguf":  # streamed into the GGUF: no merged HF copy (toolbox.merge.chain)
        from toolbox.merge.chain import merge_to_gguf

        gguf = workdir / "model.gguf"
        merge_to_gguf(src, adapters, gguf, weights=weights, dtype=p.get("dtype"), outtype=p.get("outtype") or "auto",
                      name=p.get("name"), mau_declaration=ctx.mau_declaration, fix_name=ctx.fix_name,
                      progress=ctx.progress, **gguf_options(p, ctx))
        return gguf
    merge_adapters(src, adapters, out, weights=weights, dtype=p.get("dtype"),
                   progress=ctx.progress, license_options=_license(ctx, p), **_sharding(p))
    return out


def _prune(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.experts.prune import prune_by_criterion, prune_experts

    out = workdir / ("model.gguf" if p.get("to") == "gguf" else "model")  # to gguf: streamed, no HF copy
    common = {"progress": ctx.progress, "license_options": _license(ctx, p), "to": p.get("to") or "hf",
              "outtype": p.get("outtype") or "auto", **_sharding(p), **gguf_options(p, ctx)}
    if p.get("keep_count") is not None:
        prune_by_criterion(src, out, count=int(p["keep_count"]), criterion=p["criterion"],
                           calibration=p.get("calibration"), **common)
    else:
        prune_experts(src, out, keep=p.get("keep"), drop=p.get("drop"), **common)  # a list, or {layer: list}
    return out


def _extract(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.experts.extract import extract_dense, most_used_experts

    out = workdir / ("model.gguf" if p.get("to") == "gguf" else "model")  # to gguf: streamed, no HF copy
    expert, extra = p["expert"], None
    if expert == "auto":
        expert, extra = most_used_experts(src, p.get("calibration"), progress=ctx.progress)
    extract_dense(src, out, expert=expert, extra_provenance=extra, progress=ctx.progress,
                  license_options=_license(ctx, p), to=p.get("to") or "hf", outtype=p.get("outtype") or "auto",
                  **_sharding(p), **gguf_options(p, ctx))
    return out


def _sharding(p: dict[str, Any]) -> dict[str, Any]:
    """A merge/prune/extract step's `shard_size` as max_shard_bytes, and `shards`: the files one fan-out task
    writes (`toolbox.recipe.ray_executor` adds it to a task's copy of the parameters; a recipe cannot, its schema
    has no such field), as `toolbox.experts.output.write_checkpoint` takes it ([] is the rest of the directory)."""
    from toolbox.tensors.sink import MIN_SPLIT_BYTES, parse_size

    out: dict[str, Any] = {}
    if p.get("shard_size"):
        out["max_shard_bytes"] = parse_size(p["shard_size"], minimum=MIN_SPLIT_BYTES)
    if p.get("shards") is not None:
        out["shards"] = tuple(int(i) for i in p["shards"])
    return out


def shard_count(uses: str, p: dict[str, Any], src: Path) -> int:
    """How many safetensors files a step writes, from headers alone, where each can be written by its own task: a
    merge (LoRA or weights: a weight merge's statistics are per tensor, and its output has the base's tensors), a
    prune by an explicit keep/drop list or an extract of a given expert, to HF (1 for anything else: a prune by
    criterion or an `expert: auto` would measure statistics in every task; GGUF outputs are one task)."""
    max_bytes = _sharding(p).get("max_shard_bytes")
    if (p.get("to") or "hf") != "hf":
        return 1
    if uses == "prune" and p.get("keep_count") is None:
        from toolbox.experts.prune import prune_shard_count

        return prune_shard_count(src, keep=p.get("keep"), drop=p.get("drop"), max_shard_bytes=max_bytes)
    if uses == "merge":
        from toolbox.merge.merge import merge_shard_count

        return merge_shard_count(src, dtype=p.get("dtype"), max_shard_bytes=max_bytes)
    if uses == "extract" and p.get("expert") != "auto":
        from toolbox.experts.extract import extract_shard_count

        return extract_shard_count(src, expert=p["expert"], max_shard_bytes=max_bytes)
    return 1


def _extract_lora(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    """The step's input is the fine-tune; `base` what it was fine-tuned from; the adapter is `adapter`."""
    from toolbox.merge.extract_lora import extract_lora

    out = workdir / "adapter"
    extract_lora(src, p["base"], out, rank=int(p["rank"]), rank_pattern=p.get("rank_pattern") or None,
                 targets=p.get("targets"), alpha=p.get("alpha"), dtype=p.get("dtype") or "f32",
                 svd=p.get("svd") or "auto", progress=ctx.progress, license_options=_license(ctx, p))
    return out


def _verify(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> None:
    from toolbox.verify.checks import verify_checkpoint

    against = ctx.resolve(p["against"]) if p.get("against") else None
    report = verify_checkpoint(src, deep=bool(p.get("deep")), against=against, progress=ctx.progress)
    if not report.ok:
        bad = [f for f in report.findings if f.severity != "info"]
        first = bad[0] if bad else None
        raise GateFailed(f"verify found {len(bad)} problem(s) in {src.name}"
                         + (f"; first: [{first.code}] {first.message}" if first else ""),
                         hint=f"run corral verify {src} for the full report", path=src)


def _license_check(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> None:
    from license.audit import check_artifact

    report = check_artifact(src)
    if not report.ok:
        first = report.findings[0]
        raise GateFailed(f"license check found {len(report.findings)} problem(s) in {src.name}; first: "
                         f"[{first.code}] {first.message}", hint=f"run corral license check {src}", path=src)


def _linked_copy(src: Path, workdir: Path) -> Path:
    """The input artifact hard-linked into `workdir` (a copy across file systems), with the signature and BOMs
    that lie beside a lone file, so that sign and bom add their file without touching the cached input."""
    import os
    import shutil

    from license.supply_files import bom_candidates, signature_path

    def _link_or_copy(a: Path, b: Path) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_file():
        for f in [src, signature_path(src), *bom_candidates(src)]:
            if f.is_file():
                _link_or_copy(f, workdir / f.name)
        return workdir / src.name
    out = workdir / "model"
    for f in sorted(src.rglob("*")):
        if f.is_file():
            (out / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, out / f.relative_to(src))
    return out


def _sign(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    import os

    from toolbox.supply.sign import sign_artifact

    out = _linked_copy(src, workdir)
    sign_artifact(out, p["key"], password=os.environ.get(p["password_env"]) if p.get("password_env") else None)
    return out


def _bom(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from license.supply_files import bom_path
    from toolbox.supply.bom import build_bom

    out = _linked_copy(src, workdir)
    fmt = p.get("format", "cyclonedx")
    build_bom(out, bom_path(out, fmt), fmt=fmt, force=True, progress=ctx.progress)
    return out


def _publish(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> None:
    from toolbox.supply.publish import publish

    publish(src, p["repo_id"], revision=p.get("revision"), private=bool(p.get("private")),
            create_pr=bool(p.get("create_pr")), commit_message=p.get("commit_message"),
            public_key=p.get("public_key"), progress=ctx.progress)


def _report(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    """`corral report` of the input artifact as `report.html` (deterministic, so it is cached and locked like
    any output)."""
    from toolbox.report.build import report_artifact

    out = workdir / "report.html"
    against = ctx.resolve(p["against"]) if p.get("against") else None
    report_artifact(src, out, title=p.get("title"), against=against, against_label=p.get("against") or "source",
                    progress=ctx.progress)
    return out


_OPS = {"convert": _convert, "merge": _merge, "prune": _prune, "extract": _extract, "verify": _verify,
        "extract-lora": _extract_lora,
        "license-check": _license_check, "sign": _sign, "bom": _bom, "publish": _publish, "report": _report,
        "imatrix": _imatrix, "eval": _eval}
