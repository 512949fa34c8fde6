"""The audit: does an artifact carry the obligations of the Llama license that covers it?

A model is matched to a policy by what it *is* (config architectures, GGUF architecture,
tensor names; see `license.artifact.recognise`), so a Llama 4 model relabelled under another
license is caught whatever its metadata says; when nothing structural matches, the license the
artifact claims is checked instead, and an artifact that neither is nor claims a Llama model
has no obligations to check. Directories (and files with sidecars beside them) are judged on
their sidecar files and model card plus any in-file stamps; a lone file on its in-file metadata.

Every finding names its rule (a stable code), the clause it enforces, the file, and the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from license import keys as K
from license.artifact import Artifact, FileMeta, Recognised, detect, read_file_meta, recognise
from license.card import CardFacts, read_card
from license.policy import LicensePolicy, load_policy, policy_for_label
from license.stamp import Declaration, fix_name
from toolbox.errors import ExitCode, LicensePolicyError

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Rule:
    code: str
    clause_key: str
    severity: Severity
    title: str


RULES: dict[str, Rule] = {r.code: r for r in (
    Rule("notice-missing", "notice", "error", "The Notice text is not distributed with the model"),
    Rule("notice-altered", "notice", "error", "The Notice text differs from the sentence the license prescribes"),
    Rule("license-text-missing", "agreement", "error", "No copy of the license agreement is distributed"),
    Rule("license-text-altered", "agreement", "error", "LICENSE is not the verbatim license agreement"),
    Rule("use-policy-missing", "use_policy", "error", "No copy of the Acceptable Use Policy is distributed"),
    Rule("use-policy-altered", "use_policy", "error", "USE_POLICY.md is not the verbatim Acceptable Use Policy"),
    Rule("attribution-missing", "attribution", "error", "The required attribution is not displayed"),
    Rule("card-invalid", "attribution", "error", "The model card cannot be read"),
    Rule("name-prefix", "name", "error", "The model name does not begin with the required prefix"),
    Rule("name-missing", "name", "warning", "The artifact names no model, so its name cannot be checked"),
    Rule("declaration-missing", "threshold", "error", "No declaration about the monthly-active-user threshold"),
    Rule("declaration-invalid", "threshold", "error", "The monthly-active-user declaration is not valid"),
    Rule("license-label-missing", "label", "error", "The artifact does not say which license covers it"),
    Rule("relabelled", "label", "error", "A model covered by a Llama license is labelled with another license"),
    Rule("metadata-mismatch", "label", "error", "In-file metadata disagrees with the sidecar files or other files"),
    Rule("eu-clause-missing", "multimodal", "error", "A multimodal model without the EU restriction"),
    Rule("signature-inconsistent", "supply", "warning", "The signature's signed manifest does not match the files"),
    Rule("bom-inconsistent", "supply", "warning", "The bill of materials does not match the files or the stamp"),
)}

# which clause a disagreeing key concerns
_KEY_CLAUSE = {K.NOTICE: "notice", K.ATTRIBUTION: "attribution", K.MODEL_NAME: "name", K.DECLARATION: "threshold",
               K.USE_POLICY: "use_policy", K.MULTIMODAL_RESTRICTION: "multimodal", K.MULTIMODAL: "multimodal",
               K.POLICY: "label", K.LICENSE_NAME: "label", K.LICENSE_LINK: "label"}


@dataclass
class Finding:
    code: str
    severity: Severity
    clause: str
    message: str
    fix: str
    path: str
    line: int | None = None


@dataclass
class AuditReport:
    path: str
    kind: str
    policy: str | None = None
    recognised_by: list[str] = field(default_factory=list)
    multimodal: bool = False
    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def is_llama(self) -> bool:
        """Whether a Llama license covers the artifact (recognised, or claimed by it)."""
        return self.policy is not None

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.FINDINGS

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "policy": self.policy, "compliant": self.ok,
                "recognised_by": self.recognised_by, "multimodal": self.multimodal, "files": self.files,
                "findings": [asdict(f) for f in self.findings], "notes": self.notes}


def check_artifact(path: str | Path, *, policy_id: str | None = None, hashes: bool = False) -> AuditReport:
    """Audit an HF/adapter/ONNX directory, a GGUF file or split set, or a lone .onnx/.safetensors file; and a
    signature or BOM beside it against its files (by sha256 too with `hashes`) and its stamp."""
    art = detect(path)
    metas = [read_file_meta(f) for f in art.files]
    rec = recognise(art, metas)
    card_path = art.root / "README.md"
    card = read_card(card_path) if art.has_sidecars and card_path.is_file() else None
    policy = load_policy(policy_id) if policy_id else rec.policy or _claimed_policy(metas, card)
    report = AuditReport(path=str(art.path), kind=art.kind, recognised_by=rec.evidence,
                         files=[str(m.path) for m in metas])
    if policy is None:
        report.notes.append("neither recognised as a model under a Llama license nor claiming one: "
                            "no obligations to check")
        return report
    report.policy = policy.id
    _Audit(report, policy, art, metas, card, rec).run()
    from license.supply_files import supply_findings

    stamp = next((m.corral for m in metas if m.stamped), {})
    for code, where, message, fix in supply_findings(art.path, stamp, report.notes, hashes=hashes):
        report.findings.append(Finding(code, RULES[code].severity, "supply-chain", message, fix, str(where)))
    return report


def _claimed_policy(metas: list[FileMeta], card: CardFacts | None) -> LicensePolicy | None:
    """The Llama license the artifact says it is under (when it is not recognised structurally)."""
    claims: list[tuple[str | None, str | None]] = []
    for m in metas:
        claims += [(m.meta.get(K.POLICY), None), (m.meta.get(K.GENERAL_LICENSE), m.meta.get(K.GENERAL_LICENSE_NAME)),
                   (m.meta.get(K.FOREIGN_LICENSE), m.meta.get(K.FOREIGN_LICENSE_NAME))]
    if card is not None and not card.error:
        claims += [(card.corral.get(K.CARD_POLICY), None),
                   (card.data.get("license"), card.data.get("license_name"))]
    for label, name in claims:
        policy = policy_for_label(label, name) if label else None
        if policy is not None:
            return policy
    return None


def _norm(text: str) -> str:
    return " ".join(text.replace(">", " ").split())


class _Audit:
    def __init__(self, report: AuditReport, policy: LicensePolicy, art: Artifact, metas: list[FileMeta],
                 card: CardFacts | None, rec: Recognised) -> None:
        self.r, self.p, self.art, self.metas, self.card, self.rec = report, policy, art, metas, card, rec
        self.card_ok = card is not None and card.error is None
        claimed_mm = any(m.meta.get(K.MULTIMODAL) == "true" for m in metas) or \
            (self.card_ok and card is not None and card.corral.get(K.CARD_MULTIMODAL) is True)
        self.multimodal = rec.multimodal or claimed_mm
        report.multimodal = self.multimodal
        # files whose in-file metadata is judged: all of them for a lone file, stamped ones beside sidecars
        self.judged = [m for m in metas if m.stamped or not art.has_sidecars]

    def add(self, code: str, path: Path | str, message: str, fix: str, *, clause_key: str | None = None,
            line: int | None = None) -> None:
        rule = RULES[code]
        self.r.findings.append(Finding(code, rule.severity, self.p.clause(clause_key or rule.clause_key), message,
                                       fix, str(path), line))

    def run(self) -> None:
        if self.art.has_sidecars:
            self.sidecars()
        else:
            self.r.notes.append("lone file: judged on its in-file metadata; whoever distributes it must still "
                                f"ship {', '.join(self.p.texts)} and NOTICE with it")
        unstamped = [m.path.name for m in self.metas if not m.stamped]
        if self.art.has_sidecars and unstamped:
            self.r.notes.append(f"no in-file stamp in {', '.join(unstamped)} (the sidecar files cover them; "
                                "`corral license stamp` adds one)")
        self.in_file()
        self.agreement()
        self.labels()
        self.names()
        self.declarations()
        self.eu_clause()

    # -- sidecar files ---------------------------------------------------------------------------------
    def sidecars(self) -> None:
        p, root = self.p, self.art.root
        notice = root / "NOTICE"
        stamp_fix = "run `corral license stamp PATH --mau-declaration ...`, which writes it"
        if not notice.is_file():
            self.add("notice-missing", notice, "no NOTICE file beside the model (the license requires the Notice "
                     "sentence in a \"Notice\" text file)", f'write NOTICE containing "{p.notice}"; or {stamp_fix}')
        else:
            lines = notice.read_text(encoding="utf-8", errors="replace").splitlines()
            if p.notice not in (line.strip() for line in lines):
                self.add("notice-altered", notice, "NOTICE does not contain the Notice sentence exactly as the "
                         "license states it", f'make it contain, unchanged: "{p.notice}"', line=1)
        for filename in p.texts:
            f = root / filename
            code = "license-text" if filename == "LICENSE" else "use-policy"
            what = p.display_name if filename == "LICENSE" else f"{p.family} Acceptable Use Policy"
            fix = f"copy the verbatim {what} into {filename}; or {stamp_fix}"
            if not f.is_file():
                self.add(f"{code}-missing", f, f"no {filename} (a copy of the {what}) beside the model", fix)
            elif f.read_bytes() != p.text_bytes(filename):
                line = _first_difference(f.read_bytes(), p.text_bytes(filename))
                self.add(f"{code}-altered", f, f"{filename} is not byte-identical to the {what} "
                         f"(first difference on line {line})", fix, line=line)
        card = root / "README.md"
        if self.card is None:
            self.add("attribution-missing", card, f'no README.md model card, so nothing displays "{p.attribution}"',
                     f'write a model card that shows "{p.attribution}" prominently; or {stamp_fix}')
        elif self.card.error:
            self.add("card-invalid", card, f"README.md front matter cannot be parsed ({self.card.error})",
                     "fix the YAML between the --- lines")
        elif p.attribution not in self.card.body:
            self.add("attribution-missing", card, f'the model card does not display "{p.attribution}"',
                     f'add "{p.attribution}" near the top of README.md; or {stamp_fix}')

    # -- in-file metadata ------------------------------------------------------------------------------
    def in_file(self) -> None:
        p = self.p
        for m in self.judged:
            notice = m.meta.get(K.NOTICE)
            if notice is None and not self.art.has_sidecars:
                self.add("notice-missing", m.path, f"no Notice sentence in the file's metadata ({K.NOTICE}) and no "
                         "NOTICE file beside it", "run `corral license stamp FILE --mau-declaration ...`")
            elif notice is not None and notice != p.notice:
                self.add("notice-altered", m.path, f"{K.NOTICE} is not the Notice sentence exactly as the license "
                         "states it", f'set it to "{p.notice}" (corral license stamp does)')
            if not self.art.has_sidecars and m.meta.get(K.ATTRIBUTION) != p.attribution:
                self.add("attribution-missing", m.path, f'the file does not carry "{p.attribution}" '
                         f"({K.ATTRIBUTION}) and has no model card beside it", "run `corral license stamp FILE ...`")

    def agreement(self) -> None:
        """Stamped files agree with each other and with the model card's corral fields."""
        compared = (K.POLICY, K.LICENSE_NAME, K.LICENSE_LINK, K.NOTICE, K.ATTRIBUTION, K.USE_POLICY, K.DECLARATION,
                    K.MULTIMODAL_RESTRICTION, K.MODEL_NAME, K.MULTIMODAL)
        stamped = [m for m in self.metas if m.stamped]
        sources: list[tuple[str, Path, dict[str, str]]] = [(m.path.name, m.path, m.corral) for m in stamped]
        for index in self.art.index_files:
            meta = _index_metadata(index)
            if any(K.is_stamp_key(k) for k in meta):
                sources.append((index.name, index, meta))
        if len(sources) > 1:
            first_name, _, first = sources[0]
            for _name, path, meta in sources[1:]:
                for key in compared:
                    if meta.get(key) != first.get(key):
                        self.add("metadata-mismatch", path, f"{key} is {meta.get(key)!r} here but {first.get(key)!r} "
                                 f"in {first_name}", "stamp the artifact again so every file says the same",
                                 clause_key=_KEY_CLAUSE[key])
        if not (self.card_ok and self.card and self.card.corral and sources):
            return
        c = self.card.corral
        multimodal = c.get(K.CARD_MULTIMODAL)
        card_view = {K.POLICY: c.get(K.CARD_POLICY), K.MODEL_NAME: c.get(K.CARD_MODEL_NAME),
                     K.DECLARATION: c.get(K.CARD_DECLARATION),
                     K.MULTIMODAL: None if multimodal is None else str(bool(multimodal)).lower()}
        name, path, meta = sources[0]
        for key, value in card_view.items():
            if value is not None and meta.get(key) is not None and str(value) != meta[key]:
                self.add("metadata-mismatch", path, f"{key} is {meta[key]!r} in {name} but the model card says "
                         f"{value!r}", "stamp the artifact again so the files and the card agree",
                         clause_key=_KEY_CLAUSE[key])

    # -- license labels --------------------------------------------------------------------------------
    def labels(self) -> None:
        p = self.p
        labels: list[tuple[str, Path, str, str | None]] = []
        card_path = self.art.root / "README.md"
        if self.card_ok and self.card is not None:
            lic = self.card.data.get("license")
            if lic:
                labels.append(("the model card's license", card_path, str(lic), self.card.data.get("license_name")))
            else:
                self.add("license-label-missing", card_path, "the model card's front matter has no license field",
                         f"set license: {p.hub_license}" + (f" and license_name: {p.hub_license_name}"
                                                            if p.hub_license == "other" else ""))
        for m in self.metas:
            for key, name_key in K.LICENSE_LABEL_KEYS:
                if m.meta.get(key):
                    labels.append((f"{m.path.name} {key}", m.path, m.meta[key], m.meta.get(name_key)))
            if m.meta.get(K.POLICY) and m.meta[K.POLICY] != p.id:
                labels.append((f"{m.path.name} {K.POLICY}", m.path, m.meta[K.POLICY], None))
        why = (f"it is recognised as a {p.family} model ({'; '.join(self.rec.evidence[:2])})" if self.rec.policy is p
               else f"it is declared a {p.family} model elsewhere")
        for where, path, label, name in labels:
            if not p.names_license(label, name) and label != p.id:
                shown = f"{label} ({name})" if name else label
                self.add("relabelled", path, f"{where} is {shown!r}, but {why}, which is under the {p.display_name}",
                         f"{_relabel_fix(p, path)} (corral license stamp --force does)")
        in_file_labelled = any(m.meta.get(K.GENERAL_LICENSE) or m.meta.get(K.FOREIGN_LICENSE) or m.meta.get(K.POLICY)
                               for m in self.metas)
        if not self.art.has_sidecars and not in_file_labelled:
            for m in self.metas:
                self.add("license-label-missing", m.path, "the file does not say which license covers it "
                         f"({K.GENERAL_LICENSE if m.fmt == 'gguf' else K.POLICY} is absent)",
                         "run `corral license stamp FILE --mau-declaration ...`")
        elif self.art.has_sidecars and self.card is None and not in_file_labelled:
            self.add("license-label-missing", card_path, "nothing in the artifact says which license covers it",
                     "run `corral license stamp PATH --mau-declaration ...`")

    # -- names -----------------------------------------------------------------------------------------
    def names(self) -> None:
        p = self.p
        found: list[tuple[str, Path, str, int | None]] = []
        if self.card_ok and self.card is not None:
            if self.card.title:
                found.append(("model card title", self.card.path, self.card.title, _title_line(self.card)))
            if isinstance(self.card.corral.get(K.CARD_MODEL_NAME), str):
                found.append(("model card corral.model_name", self.card.path, self.card.corral[K.CARD_MODEL_NAME],
                              None))
        for m in self.metas:
            for key in (K.GENERAL_NAME, K.MODEL_NAME):
                if m.meta.get(key):
                    found.append((f"{m.path.name} {key}", m.path, m.meta[key], None))
        if not found:
            where = self.card.path if self.card is not None else (self.metas[0].path if self.metas else self.art.path)
            self.add("name-missing", where, "no model name anywhere (card title, general.name or "
                     f"{K.MODEL_NAME}), so the {p.name_prefix!r} prefix cannot be checked",
                     "give the model a name that begins with "
                     f"{p.name_prefix!r} (corral license stamp --name NAME)")
            return
        bad: dict[str, list[tuple[str, Path, int | None]]] = {}
        for where, path, value, line in found:
            if not value.strip().startswith(p.name_prefix):
                bad.setdefault(value, []).append((where, path, line))
        for value, places in bad.items():
            where, path, line = places[0]
            self.add("name-prefix", path, f"model name {value!r} ({', '.join(w for w, _, _ in places)}) does not "
                     f"begin with {p.name_prefix!r}",
                     f"rename it {fix_name(value, p)!r} (corral license stamp --fix-name)", line=line)

    # -- section 2 declaration ---------------------------------------------------------------------------
    def declarations(self) -> None:
        p = self.p
        found: list[tuple[str, Path, str]] = []
        if self.card_ok and self.card is not None and self.card.corral.get(K.CARD_DECLARATION) is not None:
            found.append(("model card", self.card.path, str(self.card.corral[K.CARD_DECLARATION])))
        for m in self.metas:
            if m.meta.get(K.DECLARATION) is not None:
                found.append((m.path.name, m.path, m.meta[K.DECLARATION]))
        how = f"declare {p.below_threshold} or meta-license:REFERENCE (corral license stamp --mau-declaration)"
        if not found:
            where = self.card.path if self.card is not None else (self.metas[0].path if self.metas else self.art.path)
            self.add("declaration-missing", where, f"no declaration about the {p.threshold_words} threshold "
                     f"({K.DECLARATION} / card corral.{K.CARD_DECLARATION})", how)
        for where, path, text in found:
            try:
                Declaration.parse(text, p)
            except LicensePolicyError as exc:
                self.add("declaration-invalid", path, f"{where}: {exc.message}", how)

    # -- EU clause -----------------------------------------------------------------------------------------
    def eu_clause(self) -> None:
        p = self.p
        if not (self.multimodal and p.multimodal_restriction):
            return
        why = self.rec.multimodal_evidence or "its metadata says it is multimodal"
        fix = "state the EU restriction of the Acceptable Use Policy (corral license stamp does)"
        text = _norm(p.multimodal_restriction)
        if self.card_ok and self.card is not None and text not in _norm(self.card.body):
            self.add("eu-clause-missing", self.card.path, f"multimodal model ({why}) but the model card does not "
                     "state the EU restriction on multimodal models", fix)
        for m in self.judged:
            if m.meta.get(K.MULTIMODAL_RESTRICTION) != p.multimodal_restriction:
                self.add("eu-clause-missing", m.path, f"multimodal model ({why}) but {K.MULTIMODAL_RESTRICTION} is "
                         "missing or altered in the file", fix)
        if not self.card_ok and not self.judged:
            self.add("eu-clause-missing", self.art.root, f"multimodal model ({why}) and nothing states the EU "
                     "restriction on multimodal models", fix)


def _relabel_fix(p: LicensePolicy, path: Path) -> str:
    if path.name == "README.md":
        name = f" and license_name: {p.hub_license_name}" if p.hub_license == "other" else ""
        return f"set license: {p.hub_license}{name} in the card's front matter"
    if path.suffix == ".gguf":
        return f"set general.license to {p.gguf_license}"
    return f"set {K.POLICY} to {p.id} and remove the other license key"


def _index_metadata(path: Path) -> dict[str, str]:
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False), start=1):
        if x != y:
            return i
    return min(len(a.splitlines()), len(b.splitlines())) + 1


def _title_line(card: CardFacts) -> int | None:
    """Line of the title in README.md (front matter included), for SARIF regions."""
    if not card.title:
        return None
    for i, line in enumerate(card.path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if re.fullmatch(r"#\s+" + re.escape(card.title) + r"\s*", line):
            return i
    return None
