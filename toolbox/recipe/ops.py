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

GATES_OPS = ("verify", "license-check")


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
    from toolbox.convert import ConvertRequest, convert

    to = p["to"]
    request = ConvertRequest(src, to, workdir / ("model.gguf" if to == "gguf" else "model"),
                             outtype=p.get("outtype") or "auto", dtype=p.get("dtype") or "auto",
                             split_max_size=p.get("split_max_size") or 0, opset=p.get("opset"),
                             kv_cache=p.get("kv_cache", True), mmproj=p.get("mmproj"),
                             mmproj_outtype=p.get("mmproj_outtype"),
                             allow_lossy_config=p.get("allow_lossy_config", False), license=_license(ctx, p),
                             tensor_types=tuple(p.get("tensor_types") or ()),
                             output_tensor_type=p.get("output_tensor_type"),
                             token_embedding_type=p.get("token_embedding_type"), pure=bool(p.get("pure")),
                             imatrix=Path(p["imatrix"]) if p.get("imatrix") else None,
                             include_weights=tuple(p.get("include_weights") or ()),
                             exclude_weights=tuple(p.get("exclude_weights") or ()))
    return convert(request, progress=ctx.progress).paths[0]


def _merge(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.merge import merge_adapters  # type: ignore[import-not-found]

    out = workdir / "model"
    adapters = [a["path"] for a in p["adapters"]]
    weights = [float(a.get("weight", 1.0)) for a in p["adapters"]]
    merge_adapters(src, adapters, out, weights=weights, dtype=p.get("dtype"),
                   progress=ctx.progress, license_options=_license(ctx, p))
    return out


def _prune(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.experts.prune import prune_by_criterion, prune_experts

    out = workdir / "model"
    common = {"progress": ctx.progress, "license_options": _license(ctx, p)}
    if p.get("keep_count") is not None:
        prune_by_criterion(src, out, count=int(p["keep_count"]), criterion=p["criterion"],
                           calibration=p.get("calibration"), **common)
    else:
        prune_experts(src, out, keep=p.get("keep"), drop=p.get("drop"), **common)  # a list, or {layer: list}
    return out


def _extract(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.experts.extract import extract_dense, most_used_experts

    out = workdir / "model"
    expert, extra = p["expert"], None
    if expert == "auto":
        expert, extra = most_used_experts(src, p.get("calibration"), progress=ctx.progress)
    extract_dense(src, out, expert=expert, extra_provenance=extra, progress=ctx.progress,
                  license_options=_license(ctx, p))
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


_OPS = {"convert": _convert, "merge": _merge, "prune": _prune, "extract": _extract, "verify": _verify,
        "license-check": _license_check}
