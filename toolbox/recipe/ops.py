"""What each recipe step does: a thin call into the same library function as the CLI command.

An operation gets its input checkpoint (a directory or a GGUF/ONNX path), a fresh directory to
write into, and its parameters; it returns the artifact it made (a file or a directory inside
`workdir`) or, for gates, None after checking (raising GateFailed on findings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError, ExitCode
from toolbox.progress import Progress

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


def _license(ctx: OpContext) -> dict[str, Any]:
    return {"mau_declaration": ctx.mau_declaration, "fix_name": ctx.fix_name}


def _convert(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    to = p["to"]
    if to == "gguf":
        from converters.hf_to_gguf import convert_hf_to_gguf
        from toolbox.tensors.sink import parse_size

        out = workdir / "model.gguf"
        res = convert_hf_to_gguf(src, out, outtype=p.get("outtype") or "auto",
                                 split_max_size=parse_size(p["split_max_size"]) if p.get("split_max_size") else 0,
                                 name=p.get("name"), allow_lossy_config=p.get("allow_lossy_config", False),
                                 progress=ctx.progress, **_license(ctx))
        return res.paths[0]
    out = workdir / "model"
    if to == "hf":
        if src.suffix == ".gguf":
            from converters.gguf_to_hf import convert_gguf_to_hf

            convert_gguf_to_hf(src, out, dtype=p.get("dtype") or "auto", name=p.get("name"), progress=ctx.progress,
                               **_license(ctx))
        else:
            from converters.onnx_to_hf import convert_onnx_to_hf  # type: ignore[import-not-found]

            convert_onnx_to_hf(src, out, name=p.get("name"), progress=ctx.progress, **_license(ctx))
        return out
    from converters.onnx_export import convert_hf_to_onnx  # type: ignore[import-not-found]

    dtype = p.get("dtype") or "auto"
    convert_hf_to_onnx(src, out, dtype="fp32" if dtype == "auto" else dtype, name=p.get("name"),
                       progress=ctx.progress, **_license(ctx))
    return out


def _merge(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.merge import merge_adapters  # type: ignore[import-not-found]

    out = workdir / "model"
    adapters = [a["path"] for a in p["adapters"]]
    weights = [float(a.get("weight", 1.0)) for a in p["adapters"]]
    merge_adapters(src, adapters, out, weights=weights, dtype=p.get("dtype"), name=p.get("name"),
                   progress=ctx.progress, **_license(ctx))
    return out


def _prune(p: dict[str, Any], src: Path, workdir: Path, ctx: OpContext) -> Path:
    from toolbox.experts.prune import prune_by_criterion, prune_experts

    out = workdir / "model"
    common = {"name": p.get("name"), "progress": ctx.progress, **_license(ctx)}
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
    extract_dense(src, out, expert=expert, name=p.get("name"), extra_provenance=extra, progress=ctx.progress,
                  **_license(ctx))
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
