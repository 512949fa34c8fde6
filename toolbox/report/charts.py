"""The report's charts, drawn with matplotlib from the collected document.

Deterministic by construction, so a rebuilt report is byte-identical: SVG with `svg.hashsalt` and `svg.id`
fixed per chart (clip-path ids are hashes of the salt; distinct salts keep ids unique when several SVGs
share one page), `metadata={"Date": None}` (no timestamp), text as `<text>` (`svg.fonttype: none`: no
glyph ids, and the numbers stay searchable), and `text.parse_math` off (a `$` in a file name is text, not
mathtext). Colours: Okabe & Ito's colour-blind-safe palette for categories (each also has its own marker
or a text label), viridis for heatmaps. Every axis says its unit.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "p", "<")
STATUS_COLOURS = {"built": "#0072B2", "cached": "#009E73", "failed": "#D55E00", "skipped": "#999999",
                  "planned": "#E69F00", "published": "#56B4E9"}
GIB = 1024**3


@dataclass(frozen=True)
class Chart:
    """One chart: a stable id (file name with --format svg|png, anchor in the page), its section and title."""

    id: str
    section: str
    title: str
    draw: Callable[[], Any]  # -> a matplotlib Figure


def _rc(chart_id: str) -> dict[str, Any]:
    return {"svg.hashsalt": f"corral-{chart_id}", "svg.id": chart_id, "svg.fonttype": "none",
            "text.parse_math": False, "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10,
            "figure.dpi": 100, "savefig.dpi": 100, "axes.grid": False}


def render(chart: Chart, fmt: str = "svg") -> bytes:
    """The chart as SVG text (no XML prologue, ready to inline) or PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_rc(chart.id)):
        fig = chart.draw()
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format=fmt, bbox_inches="tight",
                        metadata={"Date": None} if fmt == "svg" else {"Software": None})
        finally:
            plt.close(fig)
    data = buf.getvalue()
    if fmt == "svg":
        data = _own_ids(data[data.find(b"<svg"):], chart.id.encode())
    return data


_ID_REF = re.compile(rb'(id="|url\(#|href="#)([^")]+)')


def _own_ids(svg: bytes, prefix: bytes) -> bytes:
    """Every id of the SVG (and each reference to one) prefixed with the chart's id: matplotlib numbers its
    groups `figure_1`, `axes_1`, ... in every file, and ids must be unique in the page that inlines them."""
    def own(m: re.Match[bytes]) -> bytes:
        return m[0] if m[2] == prefix else m[1] + prefix + b"-" + m[2]

    return _ID_REF.sub(own, svg)


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


# -- expert usage --------------------------------------------------------------------------------
def _heatmap(ex: dict[str, Any], key: str, label: str) -> Any:
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(ex[key], dtype=float)
    n_layers, n_experts = m.shape
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.09 * n_experts + 2.5), 1.6 + 0.28 * n_layers))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("routed expert (index)")
    ax.set_ylabel("MoE layer (index)")
    ax.set_yticks(range(n_layers), [str(x) for x in ex["layers"]])
    step = 1 if n_experts <= 16 else 8
    ax.set_xticks(range(0, n_experts, step))
    fig.colorbar(im, ax=ax, label=label, fraction=0.04, pad=0.02)
    kept = ex.get("kept")
    if kept:
        xs, ys = [], []
        for row, layer in enumerate(ex["layers"]):
            keep = kept.get(str(layer))
            if keep is not None:
                dropped = [e for e in range(n_experts) if e not in set(keep)]
                xs += dropped
                ys += [row] * len(dropped)
        ax.scatter(xs, ys, marker="x", s=28, c="white", linewidths=1.2,
                   path_effects=[pe.withStroke(linewidth=2.4, foreground="black")])
    marked = "; × = pruned (dropped)" if kept else ""
    ax.set_title(f"{label.split(' (')[0]}: {_short(ex['source'] or ex['path'])} ({ex['tokens']} tokens, "
                 f"top-{ex['top_k']}){marked}")
    return fig


# -- quantization quality ------------------------------------------------------------------------
def _quant(q: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    tensors = q["tensors"]
    kinds = sorted({t["kind"] for t in tensors})
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    width = 0.7
    for i, kind in enumerate(kinds):
        offset = (i - (len(kinds) - 1) / 2) * width / max(len(kinds), 1)
        pts = [(t["layer"] if t["layer"] is not None else -1, t["rel_rms_error"]) for t in tensors
               if t["kind"] == kind]
        ax.scatter([x + offset for x, _ in pts], [y for _, y in pts], label=kind, s=22,
                   color=OKABE_ITO[i % len(OKABE_ITO)], marker=MARKERS[i % len(MARKERS)], edgecolors="none")
    positive = [t["rel_rms_error"] for t in tensors if t["rel_rms_error"] > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    for tol, qtype in sorted({(t["tolerance"], t["gguf_type"]) for t in tensors if t["tolerance"]}):
        ax.axhline(tol, color="#666666", linestyle="--", linewidth=0.8)
        ax.annotate(f"tolerance {qtype} {tol:g}", (1.0, tol), xycoords=("axes fraction", "data"),
                    xytext=(-4, 2), textcoords="offset points", ha="right", fontsize=7, color="#444444")
    layers = sorted({t["layer"] for t in tensors if t["layer"] is not None})
    ticks = ([-1] if any(t["layer"] is None for t in tensors) else []) + layers
    ax.set_xticks(ticks, ["global" if x == -1 else str(x) for x in ticks])
    ax.set_xlabel("decoder layer (index; global: embeddings, output, final norm)")
    ax.set_ylabel("relative RMS error ‖Δ‖/‖W‖ (ratio)")
    ax.set_title(f"per-tensor quantization error: {_short(q['path'])} against {_short(q['reference'], 40)}")
    ax.legend(title="tensor kind", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _eval(variants: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    with_top1 = [v for v in variants if v["top1_agreement"] is not None]
    cols = 2 if with_top1 else 1
    fig, axes = plt.subplots(1, cols, figsize=(5.2 * cols, 3.8), squeeze=False)
    panels = [("kl_divergence", "KL divergence to the reference (nats/token)", variants)]
    if with_top1:
        panels.append(("top1_agreement", "top-1 agreement with the reference (%)", with_top1))
    unit, div = ("GiB", GIB) if max(v["size_bytes"] for v in variants) >= GIB else ("MiB", 1024**2)
    for ax, (key, label, rows) in zip(axes[0], panels, strict=True):
        rows = sorted(rows, key=lambda v: v["size_bytes"])
        xs = [v["size_bytes"] / div for v in rows]
        ys = [v[key] * (100 if key == "top1_agreement" else 1) for v in rows]
        ax.plot(xs, ys, color=OKABE_ITO[0], linewidth=1, marker="o", markersize=5)
        for x, y, v in zip(xs, ys, rows, strict=True):
            right = x == xs[-1] and len(xs) > 1  # the largest file: its name to the left, inside the axes
            ax.annotate(_short(v["file"].rsplit("/", 1)[-1], 32), (x, y), xytext=(-4 if right else 4, 4),
                        textcoords="offset points", fontsize=7, ha="right" if right else "left")
        ax.margins(x=0.3, y=0.12)  # room for the file names
        ax.set_xlabel(f"file size ({unit})")
        ax.set_ylabel(label)
        ax.grid(True, color="#dddddd", linewidth=0.6)
    fig.suptitle("quality against size across variants")
    return fig


# -- recipe runs ---------------------------------------------------------------------------------
def _timeline(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    steps = r["steps"]
    fig, ax = plt.subplots(figsize=(8.0, 1.0 + 0.32 * len(steps)))
    ys = list(range(len(steps)))
    secs = [s["seconds"] for s in steps]
    ax.barh(ys, secs, color=[STATUS_COLOURS.get(s["status"], "#E69F00") for s in steps], height=0.6)
    top = max(secs, default=0.0) or 1.0
    for y, s in zip(ys, steps, strict=True):
        ax.text(s["seconds"] + top * 0.01, y, f"{s['status']} {s['seconds']:.2f} s", va="center", fontsize=7)
    ax.set_yticks(ys, [_short(s["label"], 40) for s in steps])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("wall time of the step (s; 0 for a cached step)")
    ax.set_title(f"recipe {r['recipe']}: step durations")
    return fig


def _graph(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    steps = r["steps"]
    depth: dict[str, int] = {"source": 0}
    for s in steps:  # steps come in dependency order
        depth[s["label"]] = depth.get(s["from"] or "source", 0) + 1
    columns: dict[int, list[str]] = {}
    for name, d in depth.items():
        columns.setdefault(d, []).append(name)
    pos = {name: (d, -i) for d, names in columns.items() for i, name in enumerate(names)}
    status = {s["label"]: s["status"] for s in steps}
    tall = max(len(v) for v in columns.values())
    fig, ax = plt.subplots(figsize=(2.6 * len(columns) + 1, 0.7 * tall + 1.0))
    for s in steps:
        (x0, y0), (x1, y1) = pos.get(s["from"] or "source", (0, 0)), pos[s["label"]]
        ax.annotate("", (x1 - 0.38, y1), (x0 + 0.38, y0),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "linewidth": 0.9})
    for name, (x, y) in pos.items():
        st = status.get(name, "source")
        ax.text(x, y, f"{_short(name, 26)}\n{st}", ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": STATUS_COLOURS.get(st, "#ffffff"),
                      "alpha": 0.35 if st != "source" else 1.0, "edgecolor": "#333333"})
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(-tall + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(f"recipe {r['recipe']}: step graph (status under each step)")
    return fig


def charts(data: dict[str, Any]) -> Iterator[Chart]:
    """Every chart the document supports, in page order; ids are stable and unique."""
    for i, q in enumerate(data["quantization"]):
        yield Chart(f"quant-error-{i}", "quantization", f"Per-tensor error: {q['path']}", lambda q=q: _quant(q))
    if data["eval"]:
        yield Chart("eval-quality-size", "quantization", "KL divergence and top-1 agreement against size",
                    lambda: _eval(data["eval"]))
    for i, ex in enumerate(data["experts"]):
        yield Chart(f"experts-frequency-{i}", "experts", f"Selection frequency: {ex['path']}",
                    lambda ex=ex: _heatmap(ex, "frequency", "selection frequency (share of tokens)"))
        yield Chart(f"experts-reap-{i}", "experts", f"REAP saliency: {ex['path']}",
                    lambda ex=ex: _heatmap(ex, "reap", "REAP saliency (mean gate x output L2 norm)"))
    for i, r in enumerate(data["recipes"]):
        if not r["steps"]:
            continue
        if any(s["from"] for s in r["steps"]):
            yield Chart(f"recipe-graph-{i}", "recipes", f"Step graph: {r['path']}", lambda r=r: _graph(r))
        yield Chart(f"recipe-timeline-{i}", "recipes", f"Step durations: {r['path']}", lambda r=r: _timeline(r))
