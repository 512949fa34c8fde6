"""The report page: one self-contained HTML file (inline CSS, inline SVG charts, no script, no request).

File names, tensor names, finding messages and model names come from strangers' files: every one is
passed through `html.escape` before it reaches the page, and a Content-Security-Policy of
`default-src 'none'` stops the browser from fetching anything should an escape ever be missed. Each number
shown also sits in a `data-value` attribute with its full precision, so a reader (or a test) can check it
against the JSON it came from.
"""

from __future__ import annotations

from html import escape
from typing import Any

from toolbox.report.charts import Chart

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header,main,footer{max-width:1180px;margin:0 auto;padding:0 20px}
header{padding-top:18px}h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #0072B2;
padding-bottom:3px;margin-top:30px}h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:14px;color:#0072B2}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:10px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:0 14px}
figure{margin:10px 0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow-x:auto}
figure svg{max-width:100%;height:auto}figcaption{font-size:12px;color:#444}
.sev{font-weight:600;padding:0 6px;border-radius:3px;color:#fff}.sev-fatal,.sev-error{background:#D55E00}
.sev-warning{background:#E69F00;color:#000}.sev-info{background:#0072B2}.ok{color:#007a5a;font-weight:600}
.bad{color:#b34700;font-weight:600}code{font-size:12px;word-break:break-all}
footer{font-size:12px;color:#555;padding:20px}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
SECTIONS = (("artifacts", "Artifacts"), ("verify", "Verify findings"), ("quantization", "Quantization quality"),
            ("experts", "Expert usage"), ("recipes", "Recipe runs"))


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def num(value: Any, fmt: str = ".6g") -> str:
    """A table cell for a number: shown rounded, the exact value in data-value."""
    if value is None:
        return "<td class=num>–</td>"
    shown = str(value) if isinstance(value, int) and not isinstance(value, bool) else format(value, fmt)
    return f'<td class=num data-value="{e(repr(value))}">{e(shown)}</td>'


def human(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


def _table(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f"<table class='{e(cls)}'><tr>{head}</tr>{''.join(f'<tr>{r}</tr>' for r in rows)}</table>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th>{v}</tr>" for k, v in rows) + "</table>"


def _findings(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> str:
    if not rows:
        return "<p class=ok>no findings</p>"
    body = [f"<td><span class='sev sev-{e(r.get('severity'))}'>{e(r.get('severity'))}</span></td>"
            + "".join(f"<td><code>{e(r.get(c))}</code></td>" if c in ("code", "tensor") else f"<td>{e(r.get(c))}</td>"
                      for c in cols) for r in rows[:2000]]
    return _table(["severity", *cols], body, "findings")


def _artifact(a: dict[str, Any]) -> str:
    out = [f"<div class=card id='artifact-{e(a['path'])}'><h3>{e(a['path'])} <small>({e(a['kind'])})</small></h3>"]
    s = a.get("summary") or {}
    if "error" in s:
        out.append(f"<p class=bad>inspect: {e(s['error'])}</p>")
    elif s:
        dtypes = ", ".join(f"{k}×{v}" for k, v in s["dtypes"].items())
        out.append(_kv([("format", f"<td>{e(s['format'])}, {e(s['architecture'])}</td>"),
                        ("variant", f"<td>{e(s['variant'])} ({e(s['shaped_like'])})</td>"),
                        ("parameters (total)", num(s["parameters_total"])),
                        ("parameters (active)", num(s["parameters_active"])),
                        ("layers / experts / top-k", f"<td>{e(s['layers'])} / {e(s['experts'])} / "
                                                     f"{e(s['top_k'])}</td>"),
                        ("size (bytes)", num(s["size_bytes"])), ("size", f"<td>{e(human(s['size_bytes']))}</td>"),
                        ("dtypes / tensor types", f"<td>{e(dtypes)}</td>")]))
    lic = a.get("license") or {}
    verdict = "<span class=ok>compliant</span>" if lic.get("compliant") else \
        f"<span class=bad>{len(lic.get('findings', []))} finding(s)</span>"
    out.append(f"<p>license audit ({e(lic.get('policy') or 'no Llama license applies')}): {verdict}</p>")
    out.append(_findings(lic.get("findings", []), ("code", "clause", "message")) if lic.get("findings") else "")
    st = a.get("stamp")
    if st:
        ops = "; ".join(e(op.get("op")) for op in st.get("operations", []))
        out.append(_kv([("stamp: name", f"<td>{e(st['name'])}</td>"),
                        ("MAU declaration", f"<td>{e(st['mau_declaration'])}</td>"),
                        ("base model", f"<td>{e(st['base_model'] or '–')} ({e(st['relation'] or '–')})</td>"),
                        ("operations", f"<td>{ops or '–'}</td>")]))
    elif "stamp" in a:
        out.append("<p class=bad>no corral license stamp in the model files</p>")
    sig, bom = a.get("signature"), a.get("bom")
    if sig:
        cls = "ok" if sig["status"] == "verified" else "bad" if sig["status"] == "FAILED" else ""
        out.append(f"<p>signature <code>{e(sig['file'])}</code>: <span class='{cls}'>{e(sig['status'])}</span></p>")
        out.extend(f"<p class=bad>{e(p)}</p>" for p in sig["problems"])
    if bom:
        out.append(f"<p>BOM <code>{e(bom['file'])}</code>: CycloneDX {e(bom['spec_version'])}, "
                   f"{e(bom['model'])}, {e(bom['files'])} file component(s), {e(bom['serial_number'])}</p>")
    out.append("</div>")
    return "".join(out)


def _verify(v: dict[str, Any]) -> str:
    counts = " ".join(f"<span class='sev sev-{k}'>{e(k)} {n}</span>" for k, n in v["counts"].items() if n)
    state = "<span class=ok>ok</span>" if v["ok"] else "<span class=bad>problems</span>"
    return (f"<div class=card><h3>{e(v['path'])}: {state}</h3><p>{counts or 'no findings'}</p>"
            + _findings(v["findings"], ("code", "message", "tensor")) + "</div>")


def _figure(chart: Chart, svg: str) -> str:
    return f"<figure id='{e(chart.id)}' class=chart>{svg}<figcaption>{e(chart.title)}</figcaption></figure>"


def _quant_tables(data: dict[str, Any]) -> str:
    out = []
    for q in data["quantization"]:
        kinds: dict[str, list[float]] = {}
        for t in q["tensors"]:
            kinds.setdefault(t["kind"], []).append(t["rel_rms_error"])
        rows = [f"<td>{e(k)}</td>{num(len(v))}{num(sum(v) / len(v))}{num(max(v))}" for k, v in sorted(kinds.items())]
        out.append(f"<h3>{e(q['path'])}: {e(q['tensors_compared'])} tensors against <code>{e(q['reference'])}"
                   f"</code></h3><p>worst: <code>{e(q['worst_tensor'])}</code></p>"
                   + _table(["kind", "tensors", "mean relative RMS error", "max"], rows, "quant"))
    if data["eval"]:
        rows = [f"<td><code>{e(v['file'])}</code></td>{num(v['size_bytes'])}{num(v['kl_divergence'])}"
                f"{num(v['top1_agreement'])}{num(v['perplexity'])}" for v in data["eval"]]
        out.append(_table(["variant", "size (bytes)", "KL divergence (nats/token)", "top-1 agreement (share)",
                           "perplexity"], rows, "eval"))
    return "".join(out)


def _experts_tables(data: dict[str, Any]) -> str:
    out = []
    for ex in data["experts"]:
        kept = ex.get("kept")
        note = f"; kept experts from <code>{e(ex.get('kept_from'))}</code> (× marks the dropped)" if kept else ""
        rows = [f"{num(t['layer'])}{num(t['expert'])}{num(t['frequency'])}{num(t['reap_max'])}"
                for t in ex["most_used"]]
        out.append(f"<h3>{e(ex['path'])}</h3><p>{e(ex['tokens'])} calibration tokens, {e(ex['experts'])} experts, "
                   f"top-{e(ex['top_k'])}{note}</p>"
                   + _table(["MoE layer", "most used expert", "its frequency", "max REAP saliency"], rows, "experts"))
    return "".join(out)


def _recipe_tables(data: dict[str, Any]) -> str:
    out = []
    for r in data["recipes"]:
        rows = [f"<td><code>{e(s['label'])}</code></td><td>{e(s['uses'])}</td><td>{e(s['status'])}</td>"
                f"{num(s['seconds'])}<td><code>{e(s['output'] or '')}</code></td>" for s in r["steps"]]
        out.append(f"<div data-path='{e(r['path'])}'><h3>recipe {e(r['recipe'])} ({e(r['path'])})</h3>"
                   + _table(["step", "uses", "status", "seconds", "output"], rows, "recipe") + "</div>")
    return "".join(out)


def _cards(items: list[str]) -> str:
    return f"<div class=cards>{''.join(items)}</div>" if items else ""


def page(data: dict[str, Any], figures: list[tuple[Chart, str]]) -> str:
    """The whole page as text."""
    by_section: dict[str, list[str]] = {}
    for chart, svg in figures:
        by_section.setdefault(chart.section, []).append(_figure(chart, svg))
    boms = [f"<div class=card><h3>BOM {e(b['path'])}</h3><p>CycloneDX {e(b['spec_version'])}: {e(b['model'])}, "
            f"{e(b['files'])} file component(s)</p></div>" for b in data["boms"]]
    body = {"artifacts": _cards([_artifact(a) for a in data["artifacts"]] + boms),
            "verify": _cards([_verify(v) for v in [*(a["verify"] for a in data["artifacts"] if "verify" in a),
                                                   *data["verify"]]]),
            "quantization": _quant_tables(data), "experts": _experts_tables(data), "recipes": _recipe_tables(data)}
    present = [(sid, title) for sid, title in SECTIONS if body[sid] or by_section.get(sid)]
    nav = "".join(f"<a href='#{sid}'>{e(title)}</a>" for sid, title in present)
    sections = "".join(f"<section id='{sid}'><h2>{e(title)}</h2>{''.join(by_section.get(sid, []))}{body[sid]}"
                       "</section>" for sid, title in present)
    inputs = ", ".join(f"<code>{e(i['path'])}</code> ({e(i['kind'])})" for i in data["inputs"])
    llama = [a["stamp"] for a in data["artifacts"] if a.get("stamp") and a["stamp"].get("policy")]
    notice = (f"<p>{e(llama[0].get('attribution') or 'Built with Llama')}. {e(llama[0].get('notice') or '')}</p>"
              if llama else "")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{CSP}\">"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<meta name=generator content='corral {e(data['corral'])}'><title>corral report</title>"
            f"<style>{CSS}</style></head><body><header><h1>corral report</h1><p>inputs: {inputs}</p>"
            f"<nav>{nav}</nav></header><main>{sections}</main><footer>{notice}<p>made by corral "
            f"{e(data['corral'])} (corral report); charts drawn with matplotlib.</p></footer></body></html>\n")
