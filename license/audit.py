"""The audit: does an artifact carry the Llama license obligations? Any format, any origin.

A Llama 4 model is recognised by what it is (config architectures, GGUF architecture, tensor
names), not by what its metadata claims, so relabelling under another license is caught.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from license.policy import LicensePolicy, load_policy
from license.stamp import BELOW, META_PREFIX
from toolbox.errors import BadInputError, CorralError, ExitCode


@dataclass
class LicenseFinding:
    code: str
    clause: str
    message: str
    fix: str
    path: str | None = None
    severity: str = "error"


@dataclass
class AuditReport:
    path: str
    format: str
    is_llama: bool = False
    findings: list[LicenseFinding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.FINDINGS

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "is_llama": self.is_llama, "compliant": self.ok,
                "findings": [asdict(f) for f in self.findings], "facts": self.facts}

    def to_sarif(self) -> dict[str, Any]:
        from toolbox import __version__

        codes = sorted({f.code for f in self.findings})
        rules = [{"id": c, "shortDescription": {"text": c.replace(".", " ")},
                  "properties": {"clause": next(f.clause for f in self.findings if f.code == c)}} for c in codes]
        results = [{"ruleId": f.code, "level": "error" if f.severity == "error" else "warning",
                    "message": {"text": f"{f.message} Fix: {f.fix}"},
                    "locations": [{"physicalLocation": {"artifactLocation": {"uri": Path(f.path or self.path)
                                                                             .as_posix()}}}]}
                   for f in self.findings]
        return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
                "runs": [{"tool": {"driver": {"name": "corral", "version": __version__,
                                              "informationUri": "https://github.com/corral/corral",
                                              "rules": rules}},
                          "results": results}]}


class _Ctx:
    def __init__(self, report: AuditReport, policy: LicensePolicy) -> None:
        self.r = report
        self.p = policy

    def add(self, code: str, clause_key: str, message: str, fix: str, path: Path | str | None = None) -> None:
        self.r.findings.append(LicenseFinding(code, self.p.clause(clause_key), message, fix,
                                              str(path) if path else None))


def check_artifact(path: str | Path, policy_id: str = "llama4") -> AuditReport:
    """Audit an HF checkpoint directory, a PEFT adapter directory or a GGUF file (or split set)."""
    p = Path(path)
    policy = load_policy(policy_id)
    if p.is_file() and p.suffix == ".gguf":
        report = AuditReport(str(p), "gguf")
        _check_gguf(p, _Ctx(report, policy))
        return report
    if p.is_dir():
        fmt = "adapter" if (p / "adapter_config.json").is_file() else "hf"
        report = AuditReport(str(p), fmt)
        _check_hf_dir(p, _Ctx(report, policy))
        return report
    raise BadInputError(f"{p}: not an HF/adapter directory or a .gguf file", path=p)


def _check_declaration(ctx: _Ctx, value: str | None, where: Path) -> None:
    if not value:
        ctx.add("license.mau-declaration-missing", "mau", f"{where}: no declaration about the 700M monthly-active-"
                "user threshold", f"corral license stamp {where} --mau-declaration {BELOW}", where)
    elif value != BELOW and not (value.startswith(META_PREFIX) and value[len(META_PREFIX):].strip()):
        ctx.add("license.mau-declaration-invalid", "mau", f"{where}: declaration {value!r} is not valid",
                f"declare {BELOW} or {META_PREFIX}REFERENCE", where)


def _check_name(ctx: _Ctx, name: str | None, where: Path, what: str) -> None:
    if name and not name.startswith(ctx.p.name_prefix):
        from license.stamp import fix_name

        ctx.add("license.name", "name", f"{where}: {what} {name!r} does not begin with {ctx.p.name_prefix!r}",
                f"rename to {fix_name(name, ctx.p)!r} (corral license stamp --name ...)", where)


def _check_sidecars(ctx: _Ctx, d: Path, required: bool) -> dict[str, Any]:
    """NOTICE/LICENSE/USE_POLICY.md/README.md beside the model; returns card facts."""
    facts: dict[str, Any] = {}
    notice = d / "NOTICE"
    if not notice.is_file():
        if required:
            ctx.add("license.notice-missing", "notice", f"{d}: no NOTICE file", "corral license stamp", notice)
    elif notice.read_text(encoding="utf-8", errors="replace").strip() != ctx.p.notice:
        ctx.add("license.notice-altered", "notice", f"{notice}: does not hold the exact Notice sentence",
                f"NOTICE must read: {ctx.p.notice}", notice)
    for filename in ctx.p.texts:
        f = d / filename
        if not f.is_file():
            if required:
                ctx.add("license.text-missing", "agreement" if filename == "LICENSE" else "use_policy",
                        f"{d}: no {filename}", f"ship the verbatim {filename} (corral license stamp)", f)
        elif f.read_bytes() != ctx.p.text_bytes(filename):
            ctx.add("license.text-altered", "agreement" if filename == "LICENSE" else "use_policy",
                    f"{f}: not byte-identical to the {ctx.p.display_name} text", "replace it with the verbatim text",
                    f)
    card = d / "README.md"
    if not card.is_file():
        if required:
            ctx.add("license.card-missing", "attribution", f"{d}: no README.md model card showing "
                    f"{ctx.p.attribution!r}", "corral license stamp", card)
        return facts
    from huggingface_hub import ModelCard

    text = card.read_text(encoding="utf-8", errors="replace")
    try:
        data = ModelCard(text).data.to_dict()
    except Exception:
        data = {}
    facts["card_license"] = data.get("license_name") or data.get("license")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), None)
    facts["card_name"] = title
    if ctx.p.attribution not in text:
        ctx.add("license.attribution", "attribution", f"{card}: does not display {ctx.p.attribution!r}",
                f"add {ctx.p.attribution!r} prominently to the model card", card)
    _check_name(ctx, title, card, "model card title")
    lic = (data.get("license"), data.get("license_name"))
    if lic[0] not in (None, ctx.p.hub_license, ctx.p.hub_license_name) or (
            lic[0] == "other" and lic[1] not in (None, ctx.p.hub_license_name)):
        ctx.add("license.relabelled", "agreement", f"{card}: declares license {lic[1] or lic[0]!r} for a Llama "
                "model", f"set license: {ctx.p.hub_license} and license_name: {ctx.p.hub_license_name}", card)
    facts["card_text"] = text
    return facts


def _check_hf_dir(d: Path, ctx: _Ctx) -> None:
    from toolbox.tensors.safetensors_format import read_header

    cfg: dict[str, Any] = {}
    if (d / "config.json").is_file():
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = {}
    archs = cfg.get("architectures") or []
    shards = sorted(x for x in d.glob("*.safetensors") if not x.name.startswith("."))
    headers = []
    for s in shards:
        try:
            headers.append(read_header(s))
        except CorralError as exc:
            raise BadInputError(exc.message, path=s) from exc
    names = {n for h in headers for n in h.tensors}
    adapter = (d / "adapter_config.json").is_file()
    is_llama4 = any(a.startswith("Llama4") for a in archs) or cfg.get("model_type") in ("llama4", "llama4_text") or \
        any("feed_forward.experts" in n or "feed_forward.router" in n for n in names)
    if adapter:
        try:
            acfg = json.loads((d / "adapter_config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            acfg = {}
        is_llama4 = is_llama4 or "llama" in str(acfg.get("base_model_name_or_path", "")).lower()
    ctx.r.is_llama = is_llama4
    if not is_llama4:
        ctx.r.facts["note"] = "not recognised as a Llama model: no obligations checked"
        return
    multimodal = "Llama4ForConditionalGeneration" in archs or any(n.startswith("vision_model.") for n in names)
    ctx.r.facts["multimodal"] = multimodal
    card = _check_sidecars(ctx, d, required=True)
    metas = [(h.path, h.metadata) for h in headers]
    for path, meta in metas:
        if meta.get("corral.license.notice") not in (None, ctx.p.notice):
            ctx.add("license.metadata-notice", "notice", f"{path}: in-file notice differs from the license's",
                    "corral license stamp", path)
        if "corral.license.policy" not in meta:
            ctx.add("license.metadata-missing", "agreement", f"{path}: no license metadata in the safetensors header",
                    "corral license stamp (writes it into every shard)", path)
            continue
        if meta["corral.license.policy"] != ctx.p.id:
            ctx.add("license.relabelled", "agreement", f"{path}: header declares license "
                    f"{meta['corral.license.policy']!r} for a Llama model", "corral license stamp", path)
        _check_declaration(ctx, meta.get("corral.license.mau_declaration"), path)
        _check_name(ctx, meta.get("corral.model.name"), path, "in-file model name")
        if card.get("card_name") and meta.get("corral.model.name") and meta["corral.model.name"] != card["card_name"]:
            ctx.add("license.metadata-mismatch", "name", f"{path}: in-file name {meta['corral.model.name']!r} "
                    f"disagrees with the model card's {card['card_name']!r}", "corral license stamp", path)
        if multimodal and "corral.license.multimodal_restriction" not in meta:
            ctx.add("license.multimodal", "multimodal", f"{path}: multimodal model without the EU restriction",
                    "corral license stamp", path)
    if not metas:
        _check_declaration(ctx, None, d)
    if multimodal and card.get("card_text") is not None and ctx.p.multimodal_restriction and \
            "European Union" not in card["card_text"]:
        ctx.add("license.multimodal", "multimodal", f"{d / 'README.md'}: multimodal model card does not state the "
                "EU restriction of the Acceptable Use Policy", "corral license stamp", d / "README.md")


def _check_gguf(p: Path, ctx: _Ctx) -> None:
    from toolbox.tensors.gguf_file import GGUFFile

    g = GGUFFile(p)
    is_llama4 = g.architecture == "llama4" or (
        any("ffn_gate_exps" in n for n in g.tensors) and g.get("tokenizer.ggml.pre") == "llama4")
    ctx.r.is_llama = is_llama4
    if not is_llama4:
        ctx.r.facts["note"] = "not recognised as a Llama model: no obligations checked"
        return
    lic = g.get("general.license")
    if lic is None:
        ctx.add("license.metadata-missing", "agreement", f"{p}: no general.license", "corral license stamp", p)
    elif lic != ctx.p.gguf_license:
        ctx.add("license.relabelled", "agreement", f"{p}: general.license is {lic!r} for a Llama 4 model",
                f"general.license must be {ctx.p.gguf_license!r}", p)
    _check_name(ctx, g.get("general.name"), p, "general.name")
    if not g.get("general.name"):
        ctx.add("license.name", "name", f"{p}: no general.name", "corral license stamp --name Llama-...", p)
    if g.get("corral.license.notice") != ctx.p.notice:
        ctx.add("license.metadata-notice", "notice", f"{p}: no exact Notice sentence in corral.license.notice",
                "corral license stamp", p)
    if g.get("corral.license.attribution") != ctx.p.attribution:
        ctx.add("license.attribution", "attribution", f"{p}: no {ctx.p.attribution!r} attribution",
                "corral license stamp", p)
    _check_declaration(ctx, g.get("corral.license.mau_declaration"), p)
    if any((p.parent / n).exists() for n in ("NOTICE", "LICENSE")):
        _check_sidecars(ctx, p.parent, required=False)
