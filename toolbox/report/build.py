"""`build_report`: inputs in, one HTML page (or a directory of charts) out, written atomically."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.report import REPORT_FORMATS


@dataclass
class ReportResult:
    output: Path
    format: str
    charts: list[str]
    files: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "format": self.format, "charts": self.charts, "files": self.files,
                "data": self.data}


def build_report(paths: list[str | Path], output: str | Path, *, fmt: str = "html", force: bool = False,
                 labels: dict[str, str] | None = None, public_key: str | Path | None = None,
                 docs: tuple[tuple[str, Any, str], ...] = (), progress: Progress = NULL_PROGRESS) -> ReportResult:
    """Collect `paths`, draw the charts and write `output`: the page (html), or one file per chart (svg/png)
    in the directory `output`. Nothing is written when an input is refused."""
    from toolbox.report.charts import charts, render
    from toolbox.report.collect import collect
    from toolbox.report.html import page
    from toolbox.tensors.atomic import atomic_directory, atomic_file, check_output_path

    if fmt not in REPORT_FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(REPORT_FORMATS)}")
    if not paths:
        raise UsageError("nothing to report on", hint="give artifacts or saved corral JSON files")
    out = Path(output)
    check_output_path(out.absolute(), force=force)
    data = collect(paths, labels=labels, public_key=public_key, docs=docs)
    todo = list(charts(data))
    rendered: list[tuple[Any, bytes]] = []
    with progress.task("drawing charts", total=len(todo)) as task:
        for chart in todo:
            rendered.append((chart, render(chart, "svg" if fmt == "html" else fmt)))
            task.advance()
    ids = [c.id for c, _ in rendered]
    if fmt == "html":
        text = page(data, [(c, svg.decode("utf-8")) for c, svg in rendered])
        with atomic_file(out, force=force) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return ReportResult(out, fmt, ids, [str(out)], data)
    with atomic_directory(out, force=force) as staging:
        for chart, blob in rendered:
            (staging / f"{chart.id}.{fmt}").write_bytes(blob)
    return ReportResult(out, fmt, ids, [str(out / f"{i}.{fmt}") for i in ids], data)


def report_artifact(src: str | Path, output: str | Path, *, title: str | None = None, against: str | Path | None = None,
                    against_label: str = "source", progress: Progress = NULL_PROGRESS) -> ReportResult:
    """What a recipe's `uses: report` step publishes: the page of one artifact (summary, license, findings),
    with the per-tensor quantization error against `against` for a GGUF input. Paths inside the page are
    replaced by `title` and `against_label`, so the page is the same wherever the recipe cache lives."""
    from toolbox.verify.checks import verify_checkpoint

    src = Path(src)
    name = title or src.name
    labels = {str(src): name, str(src.absolute()): name}
    docs: tuple[tuple[str, Any, str], ...] = ()
    if against is not None and src.suffix == ".gguf":
        from toolbox.reference import resolve_path

        ref = resolve_path(against, progress=progress)
        labels.update({str(against): against_label, str(ref): against_label})
        doc = verify_checkpoint(src, against=ref, progress=progress).to_dict()
        docs = (("verify", doc, f"{name} against {against_label}"),)
    return build_report([src], output, labels=labels, docs=docs, force=True, progress=progress)
