"""What a report shows, gathered from its inputs into one JSON-ready document.

Each input is recognised by its content, never by its name: a GGUF file by its magic, an ONNX export or an
HF checkpoint by the files the loaders read, a recipe publish directory by its `corral-recipe.json`, and a
JSON file by the keys the command that wrote it puts there (`corral --json verify`, `experts stats`,
`recipe run`, `license check`, `eval`, a CycloneDX BOM). Everything read is a stranger's file: JSON is
read under the size and depth bounds of `toolbox.tensors.jsonio`, and a field of the wrong shape is a
one-line BadInputError naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, CorralError
from toolbox.tensors.jsonio import MiB, load_json

MAX_JSON_BYTES = MiB(64)
MAX_INPUTS = 256  # inputs on one page, published outputs of a recipe directory included
RECORD_NAME = "corral-recipe.json"  # what `corral recipe run` writes beside its outputs
SEVERITY_ORDER = ("fatal", "error", "warning", "info")
_LAYER = re.compile(r"\.layers\.(\d{1,4})\.")
# tensor-name pieces -> the kind a quantization chart groups by (first match wins)
KINDS: tuple[tuple[str, str], ...] = (
    ("vision", "vision"), ("multi_modal_projector", "vision"), ("feed_forward.experts", "routed experts"),
    ("shared_expert", "shared expert"), ("router", "router"), ("self_attn", "attention"),
    ("feed_forward", "dense MLP"), ("norm", "norm"), ("embed_tokens", "embedding"), ("lm_head", "output"))
EVAL_FIELDS = ("file", "size_bytes", "kl_divergence", "top1_agreement", "perplexity")


class UnknownInputError(BadInputError):
    """An input `corral report` does not recognise (exit 3)."""


def tensor_kind(name: str) -> str:
    return next((kind for piece, kind in KINDS if piece in name), "other")


def tensor_layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def _number(value: Any, where: str, path: Path, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{path}: {where} is not a finite number", path=path)
    return float(value)


def _text(value: Any, limit: int = 4096) -> str:
    return str(value)[:limit] if value is not None else ""


# -- recognising an input ------------------------------------------------------------------------
def classify_json(doc: Any) -> str | None:
    """Which command's JSON `doc` is, from its keys; None when it is none corral report reads."""
    if isinstance(doc, list):
        return "eval" if doc and all(isinstance(d, dict) and "kl_divergence" in d for d in doc) else None
    if not isinstance(doc, dict):
        return None
    if doc.get("bomFormat") == "CycloneDX":
        return "bom"
    if ("kl_divergence" in doc and "size_bytes" in doc) or isinstance(doc.get("variants"), list):
        return "eval"
    if {"tokens", "experts", "top_k"} <= doc.keys() and isinstance(doc.get("layers"), dict):
        return "experts-stats"
    if {"findings", "checked", "exit_code"} <= doc.keys():
        return "verify"
    if {"compliant", "policy", "findings"} <= doc.keys():
        return "license"
    if "recipe" in doc and isinstance(doc.get("steps"), list) and "dry_run" in doc:
        return "recipe-run"
    if "recipe" in doc and "recipe_sha256" in doc and isinstance(doc.get("outputs"), list):
        return "recipe-record"
    return None


def detect_input(path: Path) -> tuple[str, Any]:
    """(kind, parsed JSON or None) of one input path; UnknownInputError when it is nothing a report reads."""
    from toolbox.verify.onnx_checks import is_onnx

    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory", path=path)
    if path.is_dir():
        if (path / RECORD_NAME).is_file():
            return "recipe-dir", None
        if is_onnx(path):
            return "onnx", None
        if (path / "config.json").is_file() or (path / "params.json").is_file():
            return "hf", None
    elif path.is_file():
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"GGUF"):
            return "gguf", None
        if head.lstrip()[:1] in (b"{", b"["):
            doc = load_json(path, max_bytes=MAX_JSON_BYTES, error=BadInputError)
            kind = classify_json(doc)
            if kind is not None:
                return kind, doc
        elif is_onnx(path):
            return "onnx", None
    raise UnknownInputError(
        f"{path}: not an artifact or a saved corral JSON that corral report reads",
        hint="give HF/ONNX directories, .gguf files, or JSON from corral --json verify | experts stats | "
             "recipe run | license check | eval", path=path)


# -- artifacts -----------------------------------------------------------------------------------
def _summary(info: dict[str, Any]) -> dict[str, Any]:
    """The inspect facts a page shows, the same keys for HF, GGUF and ONNX."""
    params = info.get("parameters") or {}
    size = info.get("bytes") if "bytes" in info else (info.get("shards") or {}).get("bytes")
    return {"format": info.get("format"), "architecture": info.get("architecture"), "name": info.get("name"),
            "variant": info.get("variant"), "shaped_like": info.get("shaped_like"),
            "parameters_total": params.get("total", params.get("text")),
            "parameters_active": params.get("active_text"), "size_bytes": size,
            "dtypes": dict(sorted((info.get("dtypes") or info.get("types") or {}).items())),
            "layers": (info.get("layers") or {}).get("count"), "experts": (info.get("experts") or {}).get("count"),
            "top_k": (info.get("experts") or {}).get("top_k")}


def _stamp(path: Path) -> dict[str, Any] | None:
    """The corral license stamp of the artifact's first stamped model file, its provenance decoded."""
    from license import keys as K
    from license.artifact import detect, read_file_meta
    from license.stamp import prior_history

    art = detect(path)
    for f in art.files[:64]:
        meta = read_file_meta(f)
        if meta.stamped:
            corral = meta.corral
            history = prior_history(corral)
            return {"name": corral.get(K.MODEL_NAME), "policy": corral.get(K.POLICY),
                    "mau_declaration": corral.get(K.DECLARATION), "attribution": corral.get(K.ATTRIBUTION),
                    "notice": corral.get(K.NOTICE), "base_model": corral.get(K.BASE_MODEL),
                    "relation": corral.get(K.BASE_RELATION), "operations": history.get("operations", [])}
    return None


def signature_status(path: Path, public_key: Path | None) -> dict[str, Any] | None:
    """Signature status when a model-signing bundle sits where `corral sign` puts it."""
    from toolbox.supply.sign import default_signature, verify_signature

    sig = default_signature(path)
    if not sig.is_file():
        return None
    if public_key is None:
        return {"file": sig.name, "status": "present, not verified (no --public-key)", "problems": []}
    result = verify_signature(path, public_key)
    return {"file": sig.name, "status": "verified" if result.ok else "FAILED", "problems": result.problems[:50]}


def _bom_in(path: Path) -> dict[str, Any] | None:
    """A CycloneDX BOM inside an artifact directory (`corral bom DIR -o DIR/NAME.cdx.json`)."""
    if not path.is_dir():
        candidates = [path.with_name(path.name + ".cdx.json"), path.with_suffix(".cdx.json")]
    else:
        candidates = sorted(p for p in path.iterdir() if p.name.endswith((".cdx.json", "bom.json")))[:4]
    for c in candidates:
        if c.is_file():
            doc = load_json(c, max_bytes=MAX_JSON_BYTES, error=BadInputError)
            if classify_json(doc) == "bom":
                return bom_summary(doc, c)
    return None


def bom_summary(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    comp = meta.get("component") if isinstance(meta.get("component"), dict) else {}
    nested = comp.get("components") if isinstance(comp.get("components"), list) else []
    return {"file": path.name, "spec_version": _text(doc.get("specVersion"), 16),
            "serial_number": _text(doc.get("serialNumber"), 128), "model": _text(comp.get("name"), 256),
            "type": _text(comp.get("type"), 64), "files": len(nested)}


def artifact_entry(path: Path, kind: str, label: str, public_key: Path | None) -> dict[str, Any]:
    """Inspect, license audit, structural verify, stamp, signature and BOM of one artifact."""
    from license.audit import check_artifact
    from toolbox.inspect import inspect_checkpoint
    from toolbox.verify.checks import verify_checkpoint

    entry: dict[str, Any] = {"path": label, "kind": kind}
    try:
        entry["summary"] = _summary(inspect_checkpoint(path))
    except CorralError as exc:
        entry["summary"] = {"error": exc.message}
    audit = check_artifact(path)
    entry["license"] = {"policy": audit.policy, "compliant": audit.ok,
                        "findings": [{"code": f.code, "severity": str(f.severity), "clause": f.clause,
                                      "message": f.message} for f in audit.findings]}
    entry["stamp"] = _stamp(path)
    entry["signature"] = signature_status(path, public_key)
    entry["bom"] = _bom_in(path)
    entry["verify"] = verify_entry(verify_checkpoint(path).to_dict(), label)
    return entry


# -- saved command output ------------------------------------------------------------------------
def verify_entry(doc: dict[str, Any], label: str) -> dict[str, Any]:
    findings = doc.get("findings")
    if not isinstance(findings, list):
        raise BadInputError(f"{label}: verify JSON field 'findings' is not a list")
    rows = [{"severity": _text(f.get("severity"), 16), "code": _text(f.get("code"), 128),
             "message": _text(f.get("message")), "tensor": _text(f.get("tensor"), 512)}
            for f in findings if isinstance(f, dict)]
    rows.sort(key=lambda r: SEVERITY_ORDER.index(r["severity"]) if r["severity"] in SEVERITY_ORDER else 9)
    counts = {s: sum(1 for r in rows if r["severity"] == s) for s in SEVERITY_ORDER}
    return {"path": label, "ok": bool(doc.get("ok")), "exit_code": doc.get("exit_code"), "counts": counts,
            "findings": rows}


def quant_entry(doc: dict[str, Any], path: Path, label: str) -> dict[str, Any] | None:
    """Per-tensor relative error of a `verify FILE.gguf --against HF` run, by layer and kind."""
    stats = doc.get("tensor_stats")
    if not stats:
        return None
    if not isinstance(stats, dict):
        raise BadInputError(f"{path}: verify JSON field 'tensor_stats' is not an object", path=path)
    tensors = []
    for name, s in stats.items():
        if not isinstance(s, dict):
            raise BadInputError(f"{path}: tensor_stats[{name[:80]!r}] is not an object", path=path)
        tensors.append({"name": _text(name, 512), "layer": tensor_layer(name), "kind": tensor_kind(name),
                        "gguf_type": _text(s.get("gguf_type"), 32),
                        "rel_rms_error": _number(s.get("rel_rms_error"), f"tensor_stats[{name[:80]!r}].rel_rms_error",
                                                 path),
                        "tolerance": _number(s.get("tolerance"), "tolerance", path, optional=True)})
    against = (doc.get("checked") or {}).get("against") or {}
    worst = against.get("worst") or {}
    return {"path": label, "reference": _text(against.get("reference"), 1024),
            "tensors_compared": against.get("tensors_compared", len(tensors)),
            "worst_tensor": _text(worst.get("tensor"), 512), "worst_rel_rms_error": worst.get("rel_rms_error"),
            "tensors": tensors}


def eval_entries(doc: Any, path: Path) -> list[dict[str, Any]]:
    """The documented eval shape, one object per variant: {file, size_bytes, kl_divergence, top1_agreement,
    perplexity}; a list of them or {"variants": [...]} holds several."""
    items = doc if isinstance(doc, list) else doc.get("variants", [doc]) if isinstance(doc, dict) else []
    out = []
    for i, v in enumerate(items[:MAX_INPUTS]):
        if not isinstance(v, dict):
            raise BadInputError(f"{path}: eval variant {i} is not an object", path=path)
        out.append({"file": _text(v.get("file"), 1024) or f"variant {i}",
                    "size_bytes": int(_number(v.get("size_bytes"), f"variant {i} size_bytes", path) or 0),
                    "kl_divergence": _number(v.get("kl_divergence"), f"variant {i} kl_divergence", path),
                    "top1_agreement": _number(v.get("top1_agreement"), f"variant {i} top1_agreement", path,
                                              optional=True),
                    "perplexity": _number(v.get("perplexity"), f"variant {i} perplexity", path, optional=True)})
    return out


def experts_entry(doc: dict[str, Any], path: Path, label: str) -> dict[str, Any]:
    """Frequency and REAP matrices (MoE layers x experts) of `corral --json experts stats`."""
    from toolbox.experts.stats import RouterStats

    try:
        stats = RouterStats.from_dict(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{path}: not statistics written by corral experts stats --json ({exc})",
                            path=path) from None
    if not 1 <= stats.experts <= 1024 or len(stats.layers) > 1024:
        raise BadInputError(f"{path}: {stats.experts} experts x {len(stats.layers)} layers is out of bounds",
                            path=path)
    layers = sorted(stats.layers)
    freq = [[0.0] * stats.experts for _ in layers]
    reap = [[0.0] * stats.experts for _ in layers]
    for row, layer in enumerate(layers):
        for e in stats.layers[layer]:
            if not 0 <= e.expert < stats.experts:
                raise BadInputError(f"{path}: layer {layer} names expert {e.expert} of {stats.experts}", path=path)
            freq[row][e.expert] = _number(e.frequency, f"layer {layer} expert {e.expert} frequency", path) or 0.0
            reap[row][e.expert] = _number(e.reap, f"layer {layer} expert {e.expert} reap", path) or 0.0
    top = [{"layer": layer, "expert": max(range(stats.experts), key=lambda e, r=row: (freq[r][e], -e)),
            "frequency": max(freq[row]), "reap_max": max(reap[row])} for row, layer in enumerate(layers)]
    return {"path": label, "source": _text(stats.source, 1024), "tokens": stats.tokens, "experts": stats.experts,
            "top_k": stats.top_k, "layers": layers, "frequency": freq, "reap": reap, "most_used": top, "kept": None}


def recipe_entry(doc: dict[str, Any], path: Path, label: str, kind: str) -> dict[str, Any]:
    """Step instances of a `corral --json recipe run` (status, seconds, parent) or the outputs of a
    corral-recipe.json record (no statuses there: each published output and its build time when recorded)."""
    steps = []
    raw = doc.get("steps") if kind == "recipe-run" else doc.get("outputs")
    for i, s in enumerate(raw[:1024] if isinstance(raw, list) else []):
        if not isinstance(s, dict):
            raise BadInputError(f"{path}: step {i} is not an object", path=path)
        built_by = s.get("built_by") if isinstance(s.get("built_by"), dict) else {}
        seconds = s.get("seconds", built_by.get("seconds", 0.0))
        steps.append({"label": _text(s.get("label") or s.get("step"), 512), "uses": _text(s.get("uses"), 64),
                      "from": _text(s.get("from"), 512) or None,
                      "status": _text(s.get("status"), 32) or "published",
                      "seconds": _number(seconds or 0.0, f"step {i} seconds", path),
                      "output": _text(s.get("output") or s.get("path"), 1024) or None})
    return {"path": label, "recipe": _text(doc.get("recipe"), 256), "kind": kind,
            "ok": doc.get("ok"), "built": doc.get("built"), "cached": doc.get("cached"), "steps": steps}


def mark_kept(data: dict[str, Any]) -> None:
    """Mark the kept experts on each heatmap from a pruned artifact's provenance (`prune-experts` names the
    kept experts per layer) whose expert count before pruning matches the statistics."""
    for art in data["artifacts"]:
        for op in (art.get("stamp") or {}).get("operations", []):
            kept = op.get("kept")
            if op.get("op") != "prune-experts" or not isinstance(kept, dict):
                continue
            for ex in data["experts"]:
                if ex["kept"] is None and op.get("experts_before") == ex["experts"]:
                    ex["kept"] = {str(k): sorted(int(e) for e in v if isinstance(e, int))
                                  for k, v in kept.items() if isinstance(v, list)}
                    ex["kept_from"] = art["path"]


def _add(data: dict[str, Any], kind: str, doc: Any, path: Path, label: str, queue: list[tuple[Path, str, bool]],
         key: Path | None) -> None:
    """File one recognised input into its sections of the document."""
    from toolbox.tensors.atomic import safe_join

    data["inputs"].append({"path": label, "kind": kind})
    if kind in ("hf", "gguf", "onnx"):
        data["artifacts"].append(artifact_entry(path, kind, label, key))
    elif kind == "recipe-dir":
        record = load_json(path / RECORD_NAME, max_bytes=MAX_JSON_BYTES, error=BadInputError)
        if classify_json(record) != "recipe-record":
            raise BadInputError(f"{path / RECORD_NAME}: not a corral recipe record", path=path)
        data["recipes"].append(recipe_entry(record, path / RECORD_NAME, f"{label}/{RECORD_NAME}", "recipe-record"))
        for out in record["outputs"]:  # the published outputs, inside the directory only
            rel = out.get("path") if isinstance(out, dict) else None
            if isinstance(rel, str) and rel and (target := safe_join(path, rel)).exists():
                queue.append((target, f"{label}/{rel}", True))
    elif kind == "verify":
        data["verify"].append(verify_entry(doc, label))
        if (q := quant_entry(doc, path, label)) is not None:
            data["quantization"].append(q)
    elif kind == "eval":
        data["eval"].extend(eval_entries(doc, path))
    elif kind == "experts-stats":
        data["experts"].append(experts_entry(doc, path, label))
    elif kind in ("recipe-run", "recipe-record"):
        data["recipes"].append(recipe_entry(doc, path, label, kind))
    elif kind == "license":
        data["artifacts"].append({"path": label, "kind": "license-check", "license": {
            "policy": doc.get("policy"), "compliant": bool(doc.get("compliant")),
            "findings": [{"code": _text(f.get("code"), 128), "severity": _text(f.get("severity"), 16),
                          "clause": _text(f.get("clause"), 64), "message": _text(f.get("message"))}
                         for f in doc.get("findings") or [] if isinstance(f, dict)]}})
    elif kind == "bom":
        data["boms"].append({"path": label, **bom_summary(doc, path)})


def scrub(value: Any, names: dict[str, str]) -> Any:
    """`value` with each path in `names` replaced by its label inside every string (a recipe step's report
    must not carry the cache's absolute paths: it would differ between machines)."""
    if isinstance(value, str):
        for old, new in sorted(names.items(), key=lambda kv: -len(kv[0])):  # the longest path first
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [scrub(v, names) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v, names) for k, v in value.items()}
    return value


def collect(paths: list[str | Path], *, labels: dict[str, str] | None = None, public_key: str | Path | None = None,
            docs: tuple[tuple[str, Any, str], ...] = ()) -> dict[str, Any]:
    """The report document of `paths` (each shown as `labels[path]` when given, else as given) and of
    already-parsed command output `docs` ((kind, document, label), e.g. a verify a recipe step just ran)."""
    from toolbox import __version__

    data: dict[str, Any] = {"report": 1, "corral": __version__, "inputs": [], "artifacts": [], "verify": [],
                            "quantization": [], "eval": [], "experts": [], "recipes": [], "boms": []}
    key = Path(public_key) if public_key is not None else None
    queue = [(Path(p), (labels or {}).get(str(p), str(p)), False) for p in paths]
    while queue:
        path, label, published = queue.pop(0)
        if len(data["inputs"]) >= MAX_INPUTS:
            raise BadInputError(f"more than {MAX_INPUTS} inputs for one report", hint="report on fewer paths")
        try:
            kind, doc = detect_input(path)
        except UnknownInputError:
            if not published:
                raise
            data["inputs"].append({"path": label, "kind": "other (published, not reported)"})
            continue  # a recipe's own report page, a README: published, but no artifact
        _add(data, kind, doc, path, label, queue, key)
    for kind, doc, label in docs:
        _add(data, kind, doc, Path(label), label, queue, key)
    mark_kept(data)
    return scrub(data, labels or {})


def dumps(data: dict[str, Any]) -> str:
    """The document as `--json` prints it (sorted keys, so it is as reproducible as the page)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
